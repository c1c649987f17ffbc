"""benchmarks/bench_peers.py: every system is a row (measured, or saying why not), ratios are to the fastest peer
at the same length, and the named shapes have their published sizes; the P-GPU peers (peer_cp.py's PyTorch
context parallel, peer_step.py's ALST at sp=P) shard the sequence as their libraries document."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import bench_peers
import bench_train
import peer_cp
import peer_step
from bench_train import model_flops_per_token
from easy_context.hf import models

TINY = ("shape:llama3.2-1b,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
        "num_key_value_heads=2,head_dim=16,vocab_size=256")


def row(system: str, seq: int, tps: float, peak: float) -> dict:
    return {"system": system, "seq": seq, "tokens_per_s_per_gpu": tps, "peak_gpu_gib": peak, "mfu": 0.1,
            "step_s": seq / tps, "host_peak_gib": 1.0}


def test_ratios_are_to_the_fastest_peer_at_the_same_length_never_to_this_recipe():
    rows = [row("hf", 16, 100.0, 40.0), row("hf_liger", 16, 125.0, 20.0), row("ours_ddp", 16, 150.0, 10.0),
            row("hf", 32, 50.0, 60.0), row("ours_zero3", 32, 40.0, 30.0),
            {"system": "alst", "seq": 32, "skipped": "not installed: deepspeed"}]
    bench_peers.add_ratios(rows)
    assert [r.get("best_peer") for r in rows] == ["hf_liger", "hf_liger", "hf_liger", "hf", "hf", None]
    assert rows[2]["speed_vs_best_peer"] == pytest.approx(1.2) and rows[2]["memory_vs_best_peer"] == 0.5
    assert rows[4]["speed_vs_best_peer"] == pytest.approx(0.8) and rows[4]["memory_vs_best_peer"] == 0.5
    assert "not installed: deepspeed" in bench_peers.table(rows, [])


def test_medians_skip_the_warmup_steps_and_peaks_cover_every_step():
    records = [{"step_s": 9.0, "tokens_per_s": 1.0, "peak_gpu_gib": 7.0, "host_peak_gib": 2.0},
               *({"step_s": s, "tokens_per_s": 10 / s, "peak_gpu_gib": 3.0, "host_peak_gib": 1.0} for s in (1, 2, 5))]
    got = bench_peers.median_figures(records, warmup=1)
    assert got == {"step_s": 2, "tokens_per_s": 5.0, "peak_gpu_gib": 7.0, "host_peak_gib": 2.0, "steps_timed": 3}
    assert bench_peers.median_figures(records[:1], warmup=1) is None


@pytest.mark.parametrize("shape, billions", [("llama3.2-1b", 1.236), ("qwen2.5-7b", 7.616), ("llama3-8b", 8.030)])
def test_the_named_shapes_have_their_published_parameter_counts(shape, billions):
    _, n = model_flops_per_token(f"shape:{shape}", 1024)
    assert n / 1e9 == pytest.approx(billions, abs=1e-3)


def test_a_cpu_run_measures_the_hf_loop_and_names_why_a_gpu_peer_did_not_run(tmp_path):
    out = tmp_path / "peers.json"
    bench_peers.main(["--model", TINY, "--seqlens", "32", "--steps", "2", "--systems", "hf,hf_liger",
                      "--json", str(out)])
    rows = json.load(open(out))["rows"]
    hf, liger = rows
    assert hf["steps_timed"] == 1 and hf["tokens_per_s_per_gpu"] > 0 and hf["speed_vs_best_peer"] == 1.0
    assert liger["skipped"] in ("not installed: liger-kernel", "needs a CUDA GPU (Liger's kernels are Triton)")


def test_bad_arguments_are_refused_before_anything_runs():
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--systems", "hf,megatron"])
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--steps", "1", "--warmup", "1"])


def test_p_gpu_rows_say_why_a_peer_cannot_split_a_sequence_and_why_context_parallel_needs_cuda(tmp_path):
    out = tmp_path / "peers.json"
    bench_peers.main(["--model", TINY, "--seqlens", "32", "--steps", "2", "--gpus", "2",
                      "--systems", "hf,hf_liger,torch_cp", "--json", str(out)])
    hf, liger, cp = json.load(open(out))["rows"]
    assert hf["gpus"] == liger["gpus"] == cp["gpus"] == 2
    assert hf["skipped"].startswith("no sequence parallelism") and liger["skipped"] == hf["skipped"]
    assert cp["skipped"] == peer_cp.cp_unavailable() and "CUDA" in cp["skipped"]
    assert bench_peers.missing("torch_cp", 1).startswith("needs --gpus > 1")
    assert bench_peers.missing("hf", 1) is None


def test_p_gpu_peers_launch_p_processes_with_their_own_flags():
    one = bench_peers.peer_command("alst", TINY, 65536, 3, "optimizer")
    assert "torch.distributed.run" not in one and one[one.index("--offload") + 1] == "optimizer"
    alst = bench_peers.peer_command("alst", TINY, 65536, 3, "none", gpus=4)
    assert alst[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert "--activation-offload" in alst and "--rotate" not in alst
    cp = bench_peers.peer_command("torch_cp", TINY, 1024, 3, "none", gpus=2, rotate="alltoall")
    assert cp[cp.index("--rotate") + 1] == "alltoall" and cp[cp.index("--system") + 1] == "torch_cp"


def test_p_gpu_arguments_are_checked():
    assert bench_peers.parse_args(["--systems", "torch_cp,alst", "--gpus", "8", "--cp-rotate", "alltoall"]).cp_rotate \
        == "alltoall"
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--cp-rotate", "ring"])
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--gpus", "0"])


def test_peer_step_refuses_a_process_count_a_system_has_no_meaning_at(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="P > 1 processes"):
        peer_step.main(["--system", "torch_cp", "--model", TINY])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="no sequence parallelism"):
        peer_step.main(["--system", "hf", "--model", TINY])


def documented_head_tail(q: torch.Tensor, world: int) -> torch.Tensor:
    """The reordering in PyTorch's _HeadTailLoadBalancer doc, as written there: rank r holds Q[r k:(r+1) k] and
    Q[-(r+1) k:-r k]."""
    k = q.size(0) // (2 * world)
    return torch.cat([torch.cat((q[r * k:(r + 1) * k], q[q.size(0) - (r + 1) * k:q.size(0) - r * k]))
                      for r in range(world)])


@pytest.mark.parametrize("seq, world", [(8, 2), (48, 3), (64, 4)])
def test_the_head_tail_order_is_pytorchs_documented_load_balanced_layout(seq, world):
    got = peer_cp.head_tail_order(seq, world)
    assert got == documented_head_tail(torch.arange(seq), world).tolist()
    assert sorted(got) == list(range(seq))
    with pytest.raises(ValueError):
        peer_cp.head_tail_order(seq + world, world)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def cp_shard_worker(rank: int, world: int, port: int, ids: torch.Tensor, out: str) -> None:
    join_gloo(rank, world, port)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    with peer_cp.cp_shards(mesh, ids) as shards:
        torch.save({k: v.clone() for k, v in shards.items()}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.skipif(isinstance(peer_cp.cp_api(), str), reason="this torch has no context_parallel")
def test_context_parallels_shards_concatenate_to_the_sequence_in_the_head_tail_order(tmp_path, seed):
    world, seq = 2, 24
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seed))
    mp.spawn(cp_shard_worker, args=(world, free_port(), ids, str(tmp_path)), nprocs=world)
    shards = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    order = torch.tensor(peer_cp.head_tail_order(seq, world))
    assert all(s["input_ids"].shape == (1, seq // world) for s in shards)
    cat = {k: torch.cat([s[k] for s in shards], dim=1)[0] for k in peer_cp.BUFFERS}
    assert cat["position_ids"].tolist() == order.tolist()
    assert torch.equal(cat["input_ids"], ids[0, order])
    following = torch.cat([ids[0, 1:], torch.tensor([peer_cp.IGNORE])])  # each token's label: the next token
    assert torch.equal(cat["shift_labels"], following[order])


def ulysses_worker(rank: int, world: int, port: int, seq: int, out: str) -> None:
    import deepspeed  # in the worker only: importing it costs seconds and prints its accelerator

    join_gloo(rank, world, port)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.load_config(TINY), attn_implementation="sdpa")
    mpu = peer_step.ulysses_register(model, world, seq)
    batch = next(peer_step.ulysses_batches(mpu, model.config.vocab_size, seq, 7, torch.device("cpu")))
    loss = peer_step.sp_loss(model(**batch, use_cache=False), batch["shift_labels"], mpu.get_sequence_parallel_group())
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for g in grads:
        torch.distributed.all_reduce(g)
    torch.save({"loss": loss.detach(), "grads": grads, "positions": batch["position_ids"]}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_alst_at_sp2_on_gloo_trains_the_whole_sequence_like_one_process(tmp_path):
    world, seq = 2, 32
    mp.spawn(ulysses_worker, args=(world, free_port(), seq, str(tmp_path)), nprocs=world)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.load_config(TINY), attn_implementation="sdpa")
    first = next(iter(peer_step.RandomSequences(model.config.vocab_size, seq, 7)))  # rank 0's loader's first
    ids = first["input_ids"][None]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert [g["positions"].tolist() for g in got] == [[list(range(r * 16, r * 16 + 16))] for r in range(world)]
    for g in got:  # every rank holds the loss of the whole sequence
        torch.testing.assert_close(g["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    # DeepSpeed averages the gradients over the sp ranks: the ranks' summed gradients over P are the whole one's
    for summed, p in zip(got[0]["grads"], model.parameters()):
        torch.testing.assert_close(summed / world, p.grad, rtol=1e-4, atol=1e-6)


def test_a_failed_row_names_the_error_however_long_the_traceback_after_it():
    launcher = "\n".join(f"  File \"torch/distributed/run.py\", line {i}, in main" for i in range(200))
    tail = bench_train.error_tail('Traceback (most recent call last):\n  File "peer_step.py", line 290, in <module>\n'
                                  "[rank0]: ValueError: the DeepSpeed config offloads 8.03B parameters' training "
                                  "state to this machine's host\n" + launcher)
    row = {"system": "alst", "seq": 131072, "gpus": 1, "error": bench_train.error_tail(tail, 1500)}
    assert "| alst | 131072 | failed: ValueError: the DeepSpeed config offloads 8.03B" in bench_peers.table([row], [])


def test_an_out_of_memory_row_says_how_much_was_allocated_and_how_much_was_held_free():
    # the part that tells a real shortage from fragmentation (expandable_segments would have helped)
    error = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 896.00 MiB. GPU 0 has a total capacity "
             "of 139.80 GiB of which 739.12 MiB is free. Including non-PyTorch memory, this process has 139.07 GiB "
             "memory in use. Of the allocated memory 114.07 GiB is allocated by PyTorch, and 24.26 GiB is reserved "
             "by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")
    assert bench_peers.failure_line(error) == ("out of memory (114.07 GiB allocated, 24.26 GiB reserved but "
                                               "unallocated, asked 896.00 MiB more)")


def test_profile_adds_one_profiled_step_per_row_kept_out_of_the_figures(tmp_path, capsys):
    out = tmp_path / "peers.json"
    bench_peers.main(["--model", TINY, "--seqlens", "32", "--steps", "2", "--systems", "hf,ours_ddp", "--profile",
                      "--timeout", "300", "--json", str(out)])
    rows = json.load(open(out))["rows"]
    assert [r["system"] for r in rows] == ["hf", "ours_ddp"]
    assert 0 < rows[1]["startup_s"] < rows[1]["wall_s"]  # train.py's launch to its first step
    for r in rows:
        assert r["steps_timed"] == 1, r  # step 2 timed; step 3 profiled, not timed
        assert r["profile"]["step"] == 3 and r["profile"]["wall_s"] > 0 and "kinds" in r["profile"]
    printed = capsys.readouterr().out
    assert "profile of step 3, hf at 32" in printed and "profile of step 3, ours_ddp at 32" in printed


def test_a_profiled_record_is_never_timed():
    records = [{"step_s": s, "tokens_per_s": 10 / s, "peak_gpu_gib": 1.0, "host_peak_gib": 1.0} for s in (9, 2, 4)]
    records[-1]["profiled"] = True
    assert bench_peers.median_figures(records, warmup=1)["step_s"] == 2


def _stopped_run(records: list[dict], ok: bool = False, timed_out: bool = True):
    return lambda *args, **kwargs: {"ok": ok, "timed_out": timed_out, "records": records, "tail": "timeout after 90s",
                                    "cmd": "train.py", "profile": None}


def test_a_run_stopped_at_its_time_cap_keeps_the_steps_it_finished_and_says_so(monkeypatch):
    records = [{"step_s": s, "tokens_per_s": 64 / s, "peak_gpu_gib": 2.0, "host_peak_gib": 1.0} for s in (9, 2, 4)]
    args = bench_peers.parse_args(["--model", TINY, "--seqlens", "64", "--steps", "4", "--timeout", "90"])
    monkeypatch.setattr(bench_peers, "run_ours", _stopped_run(records))
    row = bench_peers.measure("ours_ddp", args, 64)
    assert row["step_s"] == 3 and row["steps_timed"] == 2
    assert row["stopped"] == "stopped at --timeout 90 s after 3 of 4 steps"
    assert "| ours_ddp (stopped at --timeout 90 s after 3 of 4 steps) | 64 |" in bench_peers.table([row], [])


def test_a_run_that_failed_or_timed_out_before_a_timed_step_is_a_failed_row(monkeypatch):
    args = bench_peers.parse_args(["--model", TINY, "--seqlens", "64", "--timeout", "90"])
    one = [{"step_s": 9.0, "tokens_per_s": 7.0, "peak_gpu_gib": 2.0, "host_peak_gib": 1.0}]
    for run in (_stopped_run(one), _stopped_run(one * 3, timed_out=False)):  # only the warmup; out of memory
        monkeypatch.setattr(bench_peers, "run_ours", run)
        row = bench_peers.measure("ours_ddp", args, 64)
        assert "error" in row and "step_s" not in row, row


def test_a_peer_stopped_at_its_time_cap_returns_the_steps_it_printed(monkeypatch):
    script = ("import json, time\nfor i in (1, 2): print('PEER_STEP ' + json.dumps({'step': i}), flush=True)\n"
              "time.sleep(60)")
    monkeypatch.setattr(bench_peers, "peer_command", lambda *args, **kwargs: [sys.executable, "-c", script])
    r = bench_peers.run_peer("hf", TINY, 64, 4, "none", timeout=5)
    assert r["timed_out"] and not r["ok"] and [x["step"] for x in r["records"]] == [1, 2]


def test_variants_give_this_recipes_rows_once_per_flag_set_and_peers_once(monkeypatch):
    args = bench_peers.parse_args(["--model", TINY, "--seqlens", "64", "--systems", "hf,ours_ddp,ours_zero3",
                                   "--variants", "|--loss-chunk 256", "--extra=--keep-attention"])
    assert bench_peers.runs(args) == [("hf", ""), ("ours_ddp", ""), ("ours_ddp", "--loss-chunk 256"),
                                      ("ours_zero3", ""), ("ours_zero3", "--loss-chunk 256")]
    seen = []

    def run(system, model, seq, steps, gpus, timeout, extra, profile=False):
        seen.append(extra)
        return _stopped_run([{"step_s": 1.0, "tokens_per_s": 64.0, "peak_gpu_gib": 2.0, "host_peak_gib": 1.0}] * 4,
                            timed_out=False, ok=True)(system, model, seq, steps, gpus, timeout, extra, profile)

    monkeypatch.setattr(bench_peers, "run_ours", run)
    got = bench_peers.measure("ours_ddp", args, 64, "--loss-chunk 256")
    assert seen == [["--keep-attention", "--loss-chunk", "256"]]
    assert got["variant"] == "--loss-chunk 256"
    assert "| ours_ddp `--loss-chunk 256` | 64 |" in bench_peers.table([got], [])


@pytest.mark.parametrize("argv", [["--longest", "65536"], ["--longest", "131072,65536"], ["--longest", "0,64"],
                                  ["--longest", "64k,1m"], ["--seqlens", ""], ["--seqlens", "16384,x"]])
def test_bad_lengths_are_refused_before_any_row_runs(argv):
    with pytest.raises(SystemExit):
        bench_peers.parse_args(argv)


def test_the_longest_search_doubles_until_a_run_fails_and_needs_no_fixed_lengths(monkeypatch, tmp_path, capsys):
    def run(system, model, seq, steps, offload, timeout, *args, **kwargs):
        fits = seq <= {"hf": 256, "hf_liger": 64}[system]
        records = [{"step_s": seq / 100, "tokens_per_s": 100.0, "peak_gpu_gib": seq / 64, "host_peak_gib": 1.0}] * 2
        return {"ok": fits, "timed_out": False, "records": records if fits else [], "cmd": "peer_step.py",
                "profile": None, "tail": "" if fits else "torch.OutOfMemoryError: CUDA out of memory."}

    monkeypatch.setattr(bench_peers, "run_peer", run)
    monkeypatch.setattr(bench_peers, "missing", lambda system, gpus=1: None)
    out = tmp_path / "peers.json"
    bench_peers.main(["--model", TINY, "--seqlens", "", "--longest", "64,1024", "--systems", "hf,hf_liger",
                      "--steps", "2", "--json", str(out)])
    got = json.load(open(out))
    assert got["rows"] == []
    assert [(r["system"], r["longest"], [t["seq"] for t in r["tries"]]) for r in got["longest"]] == \
        [("hf", 256, [64, 128, 256, 512]), ("hf_liger", 64, [64, 128])]
    printed = capsys.readouterr().out
    assert "| hf | 256 | 64: 0.640 s, 1.0 GiB; 128: 1.280 s, 2.0 GiB; 256: 2.560 s, 4.0 GiB; 512: failed: " in printed
    assert "| hf_liger | 64 | 64: 0.640 s, 1.0 GiB; 128: failed: " in printed


def test_a_try_stopped_at_the_time_cap_before_any_error_leaves_its_length_undecided(monkeypatch, tmp_path, capsys):
    def run(system, model, seq, steps, offload, timeout, *args, **kwargs):
        fits = seq <= 64
        records = [{"step_s": 0.5, "tokens_per_s": 100.0, "peak_gpu_gib": 1.0, "host_peak_gib": 1.0}] * 2
        tail = {"hf": "timeout after 90.0s",
                "hf_liger": "torch.OutOfMemoryError: CUDA out of memory\ntimeout after 90.0s"}
        return {"ok": fits, "timed_out": not fits, "records": records if fits else [], "cmd": "peer_step.py",
                "profile": None, "tail": "" if fits else tail[system]}

    monkeypatch.setattr(bench_peers, "run_peer", run)
    monkeypatch.setattr(bench_peers, "missing", lambda system, gpus=1: None)
    out = tmp_path / "peers.json"
    bench_peers.main(["--model", TINY, "--seqlens", "", "--longest", "64,1024", "--systems", "hf,hf_liger",
                      "--steps", "2", "--timeout", "90", "--json", str(out)])
    hf, liger = json.load(open(out))["longest"]
    assert (hf["longest"], hf["undecided"]) == (64, 128)  # no error before the cap: 128 may well fit
    assert (liger["longest"], liger.get("undecided")) == (64, None)  # an error first: it does not
    printed = capsys.readouterr().out
    assert ("| hf | 64 (128 undecided) | 64: 0.500 s, 1.0 GiB; "
            "128: stopped at --timeout 90 s before a timed step ended |") in printed
    assert "| hf_liger | 64 | 64: 0.500 s, 1.0 GiB; 128: failed: " in printed
