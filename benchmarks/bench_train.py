"""Training throughput and MFU of the full recipe (train.py under accelerate + DeepSpeed), one config per launch.

  python benchmarks/bench_train.py --gpus 2 --model shape:llama2-7b --seqlens 65536,131072 \
      --backends zigzag_ring,ulysses,usp --configs zero3_offload,zero3 --steps 4 --warmup 2

Each config runs train.py on random tokens for ``--steps`` optimizer steps; the first ``--warmup`` are
dropped. MFU = (6 N + 6 L d S) x tokens/s / (GPUs x peak), N parameters, L layers, d hidden size, S
sequence length, peak 989 TFLOP/s (dense bf16, H100/H200 SXM). The measured bf16 matmul ceiling of the
same GPU is printed next to it. Results: a table on stdout and ``--json``.
``--emulate`` runs rank 0 of ``--gpus`` on one GPU (benchmarks/emulate_rank.py): the rank's compute time with
no communication, so its MFU is an upper bound that the real run's communication cost is measured against.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from profile_step import profile_lines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 989e12


def matmul_ceiling(n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s on this GPU (n x n x n)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t)


def model_flops_per_token(model: str, seq: int) -> tuple[float, int]:
    """(6 N + 6 L d S, N) for a model name or named shape; N counted on a meta-device copy (no memory)."""
    from easy_context.hf import models

    cfg = models.load_config(model)
    n = models.parameter_count(cfg)
    return 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * seq, n


def error_lines(output: str, n: int = 5) -> list[str]:
    """The last ``n`` exception lines of a run's output ("torch.OutOfMemoryError: ...", "[rank0]: ValueError: ...",
    "... out of memory"); the launcher's own ChildFailedError, which names no cause, is left out."""
    return [line for line in output.splitlines()
            if re.match(r"\s*(\[rank\d+\]:\s*)?[\w.]*(Error|Exception)\b|.*out of memory", line)
            and "ChildFailedError" not in line][-n:]


def error_tail(output: str, chars: int = 2500) -> str:
    """The last ``chars`` of a run's output, led by its exception lines wherever they were: a launcher's own
    traceback can push the child's error (say a CUDA out-of-memory) out of a plain tail."""
    head = "\n".join(error_lines(output))
    return (head + "\n...\n" if head else "") + output[-chars:]


def launch_env(gpus: int) -> dict:
    """The environment of a launch on ``gpus`` GPUs: this one, with the host's cores shared among the ranks
    (torchrun sets OMP_NUM_THREADS=1 unless it is set: DeepSpeed's CPU Adam would then run on one core)."""
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // gpus))))


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_command(cmd: list[str], env: dict | None, timeout: float) -> tuple[str, int, bool]:
    """Run ``cmd`` in its own process group: (stdout + stderr, exit status, timed out). At the timeout the whole
    group is killed: a launcher's workers would otherwise hold the output pipe open and the wait would never end.
    So is it when this process is stopped meanwhile (Ctrl-C, SIGTERM), since its own group's signal misses the
    launch's: the workers would keep the GPU busy for the next run."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers are the main thread's only
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out, proc.returncode, False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, _ = proc.communicate()
        return out, proc.returncode, True
    except BaseException:
        _kill_group(proc.pid)
        raise
    finally:
        if main:  # None: a handler not set from Python, which leaves the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group ended on its own meanwhile
        os.killpg(pid, signal.SIGKILL)


def run(gpus: int, config: str, model: str, seq: int, backend: str, steps: int, extra: list[str],
        timeout: float, profile_step: int = 0, emulate: bool = False) -> dict:
    """One train.py launch (under profile_step.py if ``profile_step``); returns its per-step log records
    (those written before a failure or the ``timeout``), whether it timed out, the tail of its output and rank
    0's profile of that step (or None).
    ``emulate``: one process plays rank 0 of ``gpus`` (benchmarks/emulate_rank.py): its memory, compute only."""
    out = tempfile.mkdtemp(prefix="bench_train_")
    script = [os.path.join(REPO, "train.py")]
    if profile_step:
        script = [os.path.join(REPO, "benchmarks", "profile_step.py"), "--step", str(profile_step),
                  "--out", os.path.join(out, "profile.json"), "--"]
    if emulate:
        script = [os.path.join(REPO, "benchmarks", "emulate_rank.py"), "--world", str(gpus), "--", *script]
    config_file = config if config.endswith(".yaml") else os.path.join(REPO, "accelerate_configs", config + ".yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
           "--num_processes", str(1 if emulate else gpus), *script, "--model", model, "--dataset", "random",
           "--seq-length", str(seq), "--backend", backend, "--max-steps", str(steps), "--output-dir", out, "--no-save",
           *extra]
    launched = time.time()
    output, returncode, timed_out = run_command(cmd, launch_env(gpus), timeout)
    ok = returncode == 0 and not timed_out
    tail = f"timeout after {timeout}s: {output[-1000:]}" if timed_out else error_tail(output)
    path = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    # launch to the start of the first step: process start, model build, DeepSpeed engine, data workers
    startup = records[0]["time"] - records[0]["step_s"] - launched if records and "time" in records[0] else None
    prof = os.path.join(out, "profile.rank0.json")
    profile = json.load(open(prof)) if os.path.exists(prof) else None
    return {"ok": ok, "timed_out": timed_out, "records": records, "tail": tail, "cmd": " ".join(cmd),
            "startup_s": startup, "profile": profile}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--model", default="shape:llama2-7b")
    p.add_argument("--seqlens", default="65536,131072")
    p.add_argument("--backends", default="zigzag_ring,ulysses,usp")
    p.add_argument("--configs", default="zero3_offload,zero3", help="names in accelerate_configs/ or .yaml paths")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=540)
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. --extra='--tiled-mlp 8192'")
    p.add_argument("--variants", default="", help="train.py flags per variant, separated by |, each run in turn "
                   "(e.g. --variants='--no-keep-attention|--keep-attention': without and with)")
    p.add_argument("--profile-step", type=int, default=0, help="profile this step (use the last; it is not "
                   "timed) with benchmarks/profile_step.py")
    p.add_argument("--emulate", action="store_true", help="run rank 0 of --gpus on one GPU "
                   "(benchmarks/emulate_rank.py): its memory and compute time, no communication; MFU is then "
                   "an upper bound")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling: {ceiling / 1e12:.0f} TFLOP/s ({ceiling / PEAK:.1%} of {PEAK / 1e12:.0f})", flush=True)
    rows = []
    for config, seq, backend, variant in itertools.product(args.configs.split(","), map(int, args.seqlens.split(",")),
                                                           args.backends.split(","), args.variants.split("|")):
        r = run(args.gpus, config, args.model, seq, backend, args.steps, args.extra.split() + variant.split(),
                args.timeout, args.profile_step, args.emulate)
        timed = [x for x in r["records"][args.warmup:] if x["step"] != args.profile_step]
        flops, n = model_flops_per_token(args.model, seq)
        row = {"config": config, "seq": seq, "backend": backend, "variant": variant, "emulated": args.emulate,
               "ok": r["ok"], "cmd": r["cmd"],
               "params": n, "steps_timed": len(timed), "startup_s": r["startup_s"], "profile": r["profile"]}
        if timed:
            tps = sum(x["tokens_per_s"] for x in timed) / len(timed)
            row.update(tokens_per_s=tps, tokens_per_s_per_gpu=tps / args.gpus, mfu=flops * tps / (args.gpus * PEAK),
                       step_s=sum(x["step_s"] for x in timed) / len(timed),
                       peak_gpu_gib=max(x["peak_gpu_gib"] for x in timed),
                       host_rss_gib=max(x["host_rss_gib"] for x in timed))
        else:
            row["error"] = r["tail"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("cmd",)}), flush=True)
    print("\n| config | S | backend | flags | tok/s/GPU | MFU | step s | peak GPU GiB | host RSS GiB/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['config']} | {r['seq']} | {r['backend']} | {r['variant'] or '-'} |"
        print(f"{head} {r['tokens_per_s_per_gpu']:.0f} | {r['mfu']:.1%} | {r['step_s']:.1f} | "
              f"{r['peak_gpu_gib']:.1f} | {r['host_rss_gib']:.1f} |" if "mfu" in r else f"{head} failed | | | | |")
    for r in rows:
        if r["profile"]:
            print("\n" + "\n".join(profile_lines(f"rank 0, {r['backend']} {r['variant'] or '-'}", r["profile"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceiling_flops": ceiling, "peak": PEAK, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
