"""benchmarks/profile_step.py: GPU kernels are sorted into kinds by name and their time is counted once."""

from types import SimpleNamespace

import profile_step


def test_kernel_names_are_sorted_into_kinds():
    assert profile_step.kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert profile_step.kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert profile_step.kind("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert profile_step.kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert profile_step.kind("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert profile_step.kind("Memcpy HtoD (Pinned -> Device)") == "memcpy"
    assert profile_step.kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor>") == "other"


def test_overlapping_kernels_are_counted_once_and_idle_time_is_what_no_compute_kernel_covers():
    kernels = [("nvjet_a", 0, 400_000), ("nvjet_b", 300_000, 500_000),  # two streams overlap by 0.1 s
               ("cudnn_sdpa", 600_000, 900_000), ("ncclDevKernel_x", 0, 1_000_000)]
    s = profile_step.summarize(kernels, wall_s=1.0)
    assert s["kinds"]["matmul"] == {"sum_s": 0.6, "union_s": 0.5, "count": 2}
    assert abs(s["compute_busy_s"] - 0.8) < 1e-12 and abs(s["no_compute_s"] - 0.2) < 1e-12
    assert s["kinds"]["nccl"]["union_s"] == 1.0


def test_idle_gaps_are_the_longest_stretches_no_compute_kernel_covers():
    kernels = [("nvjet_a", 0, 100), ("fill", 50, 300), ("ncclDevKernel_x", 300, 900),  # nccl is not compute
               ("cudnn_sdpa", 1000, 1200), ("nvjet_b", 1250, 1300)]
    gaps = profile_step.idle_gaps(kernels)
    assert [(round(g["s"] * 1e6), g["after"], g["before"]) for g in gaps] == [
        (700, "fill", "cudnn_sdpa"), (50, "cudnn_sdpa", "nvjet_b")]


def test_top_kernels_rank_names_by_summed_time():
    kernels = [("fill", 0, 100_000), ("nvjet_a", 0, 300_000), ("fill", 200_000, 500_000), ("x" * 200, 0, 10)]
    top = profile_step.top_kernels(kernels, n=2)
    assert [(t["name"], t["kind"], t["count"]) for t in top] == [("fill", "other", 2), ("nvjet_a", "matmul", 1)]
    assert abs(top[0]["sum_s"] - 0.4) < 1e-12
    assert len(profile_step.top_kernels(kernels)[2]["name"]) == 120


def _layout_copy(x):
    return x.transpose(0, 1).contiguous()


def test_top_ops_rank_dispatcher_ops_and_leave_out_kernels_and_profiler_markers():
    def event(key, us, count=1):
        return SimpleNamespace(key=key, self_device_time_total=us, input_shapes=[[4, 8]], count=count)

    events = [event("Command Buffer Full", 900_000, 90), event("nvjet_sm90_tst_128x256", 500_000),
              event("void at::native::vectorized_elementwise_kernel<4>", 400_000), event("aten::mm", 300_000, 2),
              event("aten::add_", 200_000), event("aten::view", 0)]
    prof = SimpleNamespace(key_averages=lambda group_by_input_shape: events)
    top = profile_step.top_ops(prof)
    assert [(t["op"], t["self_s"], t["count"]) for t in top] == [("aten::mm", 0.3, 2), ("aten::add_", 0.2, 1)]


def test_op_stacks_name_the_line_that_made_a_copy():
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(512, 512)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
        _layout_copy(x)
        x.add(1.0)
    rows = profile_step.top_op_stacks(prof, ops=("aten::copy_",))
    assert rows and all(r["op"] == "aten::copy_" for r in rows)
    assert any("_layout_copy" in frame for frame in rows[0]["stack"]), rows[0]["stack"]
    assert "512, 512" in rows[0]["shapes"], rows[0]["shapes"]
