"""benchmarks/bench_peers.py: every system is a row (measured, or saying why not), ratios are to the fastest peer
at the same length, and the named shapes have their published sizes."""

from __future__ import annotations

import json

import pytest

import bench_peers
from bench_train import model_flops_per_token

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
