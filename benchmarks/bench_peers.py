"""This recipe against the tools users would pick instead: the same shape, length, optimizer and steps, one after
another on one machine.

  python benchmarks/bench_peers.py --model shape:llama3.2-1b --seqlens 16384,32768,131072 --steps 4 \
      --json results/peers.json
  python benchmarks/bench_peers.py --gpus 8 --systems hf,hf_liger,alst,torch_cp,ours_ddp,ours_zero3 \
      --seqlens 131072,262144 --cp-rotate alltoall --json results/peers8.json

Systems (``--systems``): ``hf``, ``hf_liger``, ``alst`` and ``torch_cp`` run in ``peer_step.py`` (its doc says
how each is set up; ``torch_cp`` is PyTorch's own context_parallel, benchmarks/peer_cp.py); ``ours_ddp`` and
``ours_zero3`` are train.py under ``accelerate_configs/ddp.yaml`` and ``zero3.yaml`` with the flags in ``OURS``
(the recipe's defaults when that list is empty). A system that cannot run here (a missing package, no GPU, a GPU
count it has no meaning at) is a row that says why. Every system: AdamW, random tokens, one sequence per step,
``--steps`` steps of which the first ``--warmup`` are not timed; figures are medians of the timed steps.

Columns: tokens/s per GPU; MFU = (6 N + 6 L d S) x tokens/s per GPU / 989 TFLOP/s (N parameters, L layers, d
hidden size, S sequence length; the same formula for every system, recomputation not counted); peak GPU memory
(the allocator's peak) and peak host memory (the process's peak resident set; train.py: the largest rank's);
each system's speed and memory as ratios to the best peer's at that length (best = the fastest that ran).
``--variants 'A|B'`` runs this recipe's rows once per set of train.py flags (the peers once), so settings compare
against the same peer rows. ``--longest START,MAX`` adds, per system, the longest length of a doubling search that
completes its steps, and a table of its tries (``--seqlens ''``: the search alone, no fixed rows).
``--profile`` runs one step more per row under torch.profiler (kept out of the figures) and prints where each
system's step goes by kind of kernel (attention, matmul, optimizer, other...): what to close against a peer.
``--gpus P`` runs every row on P processes (torchrun for the peers, accelerate for this recipe), one sequence
split over them: ``alst`` is ALST at sp=P (DeepSpeed's Ulysses), ``torch_cp`` PyTorch's context parallel over a
mesh of P (``--cp-rotate``: allgather or alltoall); ``hf`` and ``hf_liger`` have no sequence parallelism (data
parallel holds the whole sequence on every GPU: their per-GPU figures are the 1-GPU rows'), so their P-GPU rows say
so, and ``torch_cp`` needs P > 1. Tokens/s per GPU is the sequence's tokens over the step time over P.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

from bench_train import (PEAK, error_lines, error_tail, launch_env, model_flops_per_token, run as run_train,
                         run_command)
from peer_cp import ROTATE, cp_unavailable
from profile_step import profile_lines
from easy_context.train.memory_advice import out_of_memory_sizes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = {"hf": [], "hf_liger": ["liger_kernel"], "alst": ["liger_kernel", "deepspeed", "arctic_training"],
         "torch_cp": []}
NO_SP = ("hf", "hf_liger")  # peers with no sequence parallelism
# this recipe's paths: (accelerate config, train.py flags beyond the defaults)
OURS = {"ours_ddp": ("ddp", []), "ours_zero3": ("zero3", [])}
SYSTEMS = (*PEERS, *OURS)


def missing(system: str, gpus: int = 1) -> str | None:
    """Why ``system`` cannot run on ``gpus`` GPUs of this machine (None: it can)."""
    if system in NO_SP and gpus > 1:
        return (f"no sequence parallelism: data parallel holds the whole sequence on each of the {gpus} GPUs "
                "(per-GPU figures = the 1-GPU row's)")
    if system == "torch_cp":
        return "needs --gpus > 1 (context parallel over one GPU is the hf loop)" if gpus == 1 else cp_unavailable()
    if system in PEERS:
        absent = [m for m in PEERS[system] if importlib.util.find_spec(m) is None]
        if absent:
            return "not installed: " + ", ".join(m.replace("_", "-") for m in absent)
        if system != "hf" and not torch.cuda.is_available():
            return "needs a CUDA GPU (Liger's kernels are Triton)"
    if system == "ours_zero3" and importlib.util.find_spec("deepspeed") is None:
        return "not installed: deepspeed"
    return None


def median_figures(records: list[dict], warmup: int) -> dict | None:
    """Median step time, tokens/s and the peaks over the timed records: after the ``warmup`` first, not a
    profiled one (None when none were timed)."""
    timed = [r for r in records[warmup:] if not r.get("profiled")]
    if not timed:
        return None
    return {"step_s": statistics.median(r["step_s"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "peak_gpu_gib": max(r["peak_gpu_gib"] for r in records),
            "host_peak_gib": max(r.get("host_peak_gib", r.get("host_rss_gib", 0.0)) for r in records),
            "steps_timed": len(timed)}


def peer_command(system: str, model: str, seq: int, steps: int, offload: str, gpus: int = 1,
                 rotate: str = "allgather", profile: str | None = None) -> list[str]:
    """The peer_step.py command line of ``system``: one process, or torchrun of ``gpus`` processes; with
    ``profile`` (a JSON path) one step more, profiled."""
    launch = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(gpus)]
    cmd = [*launch, os.path.join(REPO, "benchmarks", "peer_step.py"), "--system", system, "--model", model,
           "--seq-length", str(seq), "--steps", str(steps + bool(profile))]
    if profile:
        cmd += ["--profile", profile]
    if system == "alst":
        cmd += ["--offload", offload] + (["--activation-offload"] if seq >= 65536 else [])
    if system == "torch_cp":
        cmd += ["--rotate", rotate]
    return cmd


def run_peer(system: str, model: str, seq: int, steps: int, offload: str, timeout: float, gpus: int = 1,
             rotate: str = "allgather", profile: bool = False) -> dict:
    """One peer_step.py launch: {"ok", "timed_out", "records" (also those printed before a timeout), "tail", "cmd",
    "profile" (its last step's, or None)}."""
    path = os.path.join(tempfile.mkdtemp(prefix="bench_peers_"), "profile.json") if profile else None
    cmd = peer_command(system, model, seq, steps, offload, gpus, rotate, path)
    out, returncode, timed_out = run_command(cmd, launch_env(gpus), timeout)
    ok = returncode == 0 and not timed_out
    out += f"\ntimeout after {timeout}s" if timed_out else ""
    records = [json.loads(line[len("PEER_STEP "):]) for line in out.splitlines() if line.startswith("PEER_STEP ")]
    prof = json.load(open(path)) if path and os.path.exists(path) else None
    return {"ok": ok and bool(records), "timed_out": timed_out, "records": records, "tail": error_tail(out),
            "cmd": " ".join(cmd), "profile": prof}


def run_ours(system: str, model: str, seq: int, steps: int, gpus: int, timeout: float, extra: list[str],
             profile: bool = False) -> dict:
    """train.py under this recipe's ``system`` config: {"ok", "timed_out", "records", "tail", "cmd", "profile",
    "startup_s"}; with ``profile`` one step more, profiled (benchmarks/profile_step.py), its record marked
    profiled."""
    config, flags = OURS[system]
    if not torch.cuda.is_available():
        flags = [*flags, "--kernel", "reference"] if "--kernel" not in flags else flags
    total = steps + profile
    r = run_train(gpus, config, model, seq, "zigzag_ring", total, [*flags, *extra], timeout,
                  profile_step=total if profile else 0)
    records = [{**x, "profiled": True} if profile and x["step"] == total else x for x in r["records"]]
    return {"ok": r["ok"] and bool(records), "timed_out": r["timed_out"], "records": records, "tail": r["tail"],
            "cmd": r["cmd"], "profile": r["profile"], "startup_s": r["startup_s"]}


def failure_line(error: str) -> str:
    """The table's one-line reason for a failed row: its last exception line (else the first line), shortened; an
    out-of-memory error as what was allocated and what was held free (fragmentation) when it ran out."""
    oom = out_of_memory_sizes(error)
    if oom:
        asked, allocated, free = oom
        return f"out of memory ({allocated} allocated, {free} reserved but unallocated, asked {asked} more)"
    lines = error_lines(error, 1) or error.strip().splitlines() or ["?"]
    return re.sub(r"^\s*\[rank\d+\]:\s*", "", lines[-1])[:120]


def measure(system: str, args, seq: int, variant: str = "") -> dict:
    """One row: the system at ``seq`` (this recipe's with the train.py flags ``variant`` too) with its figures, or
    why it did not run."""
    row = {"system": system, "seq": seq, "gpus": args.gpus, **({"variant": variant} if variant else {})}
    why = missing(system, args.gpus)
    if why:
        return {**row, "skipped": why}
    started = time.time()
    r = (run_peer(system, args.model, seq, args.steps, args.offload, args.timeout, args.gpus, args.cp_rotate,
                  args.profile)
         if system in PEERS
         else run_ours(system, args.model, seq, args.steps, args.gpus, args.timeout,
                       [*args.extra.split(), *variant.split()], args.profile))
    row.update(cmd=r["cmd"], wall_s=time.time() - started, **({"profile": r["profile"]} if r["profile"] else {}))
    if r.get("startup_s") is not None:  # train.py's launch to its first step: start-up, not training
        row["startup_s"] = r["startup_s"]
    # a run stopped at its time cap still measured the steps it finished (a failed one may not have: say OOM)
    figures = median_figures(r["records"], args.warmup) if r["ok"] or r["timed_out"] else None
    if figures is None:
        if r["timed_out"] and not error_lines(r["tail"]):  # no error before the cap: the length may well fit
            row["undecided"] = f"stopped at --timeout {args.timeout:.0f} s before a timed step ended"
        return {**row, "error": error_tail(r["tail"], 1500)}
    if not r["ok"]:
        row["stopped"] = f"stopped at --timeout {args.timeout:.0f} s after {len(r['records'])} of {args.steps} steps"
    flops, params = model_flops_per_token(args.model, seq)
    per_gpu = figures["tokens_per_s"] / args.gpus  # every system trains one sequence over all args.gpus
    return {**row, **figures, "params": params, "tokens_per_s_per_gpu": per_gpu, "mfu": flops * per_gpu / PEAK}


def add_ratios(rows: list[dict]) -> None:
    """Each measured row's speed and peak GPU memory as ratios to the fastest peer's at its length."""
    for seq in {r["seq"] for r in rows}:
        peers = [r for r in rows if r["seq"] == seq and r["system"] in PEERS and "mfu" in r]
        best = max(peers, key=lambda r: r["tokens_per_s_per_gpu"], default=None)
        for r in rows:
            if r["seq"] == seq and "mfu" in r and best is not None:
                r["best_peer"] = best["system"]
                r["speed_vs_best_peer"] = r["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"]
                if best["peak_gpu_gib"] > 0:  # 0 on a CPU run
                    r["memory_vs_best_peer"] = r["peak_gpu_gib"] / best["peak_gpu_gib"]


def longest(system: str, args) -> dict:
    """The longest length of the doubling search from ``--longest`` that completes (rows of every try)."""
    start, limit = args.longest_range
    tries, best, seq = [], None, start
    while seq <= limit:
        row = measure(system, args, seq)
        tries.append(row)
        if "mfu" not in row:
            break
        best, seq = seq, seq * 2
    undecided = {"undecided": tries[-1]["seq"]} if tries and "undecided" in tries[-1] else {}
    return {"system": system, "longest": best, **undecided, "tries": tries}


def table(rows: list[dict], longest_rows: list[dict]) -> str:
    """The markdown table of the rows (and the longest column when searched)."""
    top = {r["system"]: r["longest"] for r in longest_rows}
    head = "| system | S | tok/s/GPU | MFU | step s | peak GPU GiB | peak host GiB | speed vs best peer | memory vs best peer |"
    lines = [head + (" longest |" if top else ""), "|---" * (9 + bool(top)) + "|"]
    for r in rows:
        tail = f" {top.get(r['system'])} |" if top else ""
        name = f"{r['system']} `{r['variant']}`" if r.get("variant") else r["system"]
        if "mfu" in r:
            memory = f"{r['memory_vs_best_peer']:.2f}x" if "memory_vs_best_peer" in r else ""
            ratio = f"{r['speed_vs_best_peer']:.2f}x ({r['best_peer']}) | {memory} |" if "best_peer" in r else " | |"
            system = f"{name} ({r['stopped']})" if "stopped" in r else name
            lines.append(f"| {system} | {r['seq']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
                         f"{r['step_s']:.3f} | {r['peak_gpu_gib']:.1f} | {r['host_peak_gib']:.1f} | {ratio}{tail}")
        else:
            why = r.get("skipped") or r.get("undecided") or "failed: " + failure_line(r["error"])
            lines.append(f"| {name} | {r['seq']} | {why} | | | | | | |{tail}")
    return "\n".join(lines)


def longest_table(longest_rows: list[dict]) -> str:
    """The markdown table of the longest search: each system's longest length (and the next one's, undecided when
    its try reached the time cap before any error) and every try (step s and peak GiB, or why it failed)."""
    lines = ["| system | longest | tries |", "|---|---|---|"]
    for r in longest_rows:
        tries = "; ".join(f"{t['seq']}: {t['step_s']:.3f} s, {t['peak_gpu_gib']:.1f} GiB" if "mfu" in t else
                          f"{t['seq']}: " + (t.get("skipped") or t.get("undecided")
                                             or "failed: " + failure_line(t["error"]))
                          for t in r["tries"])
        undecided = f" ({r['undecided']} undecided)" if "undecided" in r else ""
        lines.append(f"| {r['system']} | {r['longest']}{undecided} | {tries} |")
    return "\n".join(lines)


def lengths(text: str, flag: str) -> list[int]:
    """The positive token counts of a comma-separated ``flag`` value (ValueError naming the flag otherwise)."""
    try:
        values = [int(x) for x in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated token counts such as 16384,32768; got {text!r}") from None
    if any(v < 1 for v in values):
        raise ValueError(f"{flag} takes positive token counts; got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape:llama3.2-1b", help="a named shape (random init, no download)")
    p.add_argument("--seqlens", default="16384,32768,131072", help="the lengths of the table's rows (empty: none, "
                   "with --longest)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--offload", choices=("none", "optimizer", "all"), default="none",
                   help="alst's ZeRO-3 offload (ArcticTraining's 8B one-GPU recipes offload all)")
    p.add_argument("--cp-rotate", choices=ROTATE, default="allgather",
                   help="torch_cp: set_rotate_method's method for the K/V shards (PyTorch's default: allgather)")
    p.add_argument("--extra", default="", help="more train.py flags for this recipe's rows")
    p.add_argument("--variants", default="", help="this recipe's rows once per set of train.py flags, sets "
                   "separated by | (an empty set: the defaults), e.g. --variants='|--loss-chunk 256'")
    p.add_argument("--longest", default="", help="START,MAX: per system, double the length from START up to MAX "
                   "until a run fails; the last that completed is its longest")
    p.add_argument("--profile", action="store_true", help="one more step per row, profiled: where each system's "
                   "step time goes by kind of kernel (printed after the table; in the JSON rows)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=None, help="write the rows here (the table goes to stdout)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.systems.split(",")) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.gpus < 1:
        p.error(f"--gpus must be at least 1; got {args.gpus}")
    try:
        args.lengths = lengths(args.seqlens, "--seqlens")
        args.longest_range = tuple(lengths(args.longest, "--longest")) if args.longest else None
    except ValueError as e:
        p.error(str(e))
    if args.longest_range and (len(args.longest_range) != 2 or args.longest_range[0] > args.longest_range[1]):
        p.error(f"--longest takes START,MAX with START <= MAX, such as 131072,1048576; got {args.longest!r}")
    if not args.lengths and not args.longest:
        p.error("nothing to run: give --seqlens, --longest START,MAX, or both")
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}): nothing would be timed")
    return args


def runs(args) -> list[tuple[str, str]]:
    """(system, train.py flags) per row at one length: this recipe's systems once per ``--variants`` entry."""
    variants = args.variants.split("|") if args.variants else [""]
    return [(s, v.strip()) for s in args.systems.split(",") for v in (variants if s in OURS else [""])]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = []
    for seq in args.lengths:
        for system, variant in runs(args):
            rows.append(measure(system, args, seq, variant))
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("cmd", "error", "profile")}), flush=True)
    add_ratios(rows)
    longest_rows = [longest(s, args) for s in args.systems.split(",")] if args.longest else []
    print(f"\n{args.model}, {args.gpus} GPU(s), {args.steps} steps ({args.warmup} untimed), MFU over "
          f"{PEAK / 1e12:.0f} TFLOP/s")
    if rows:
        print(table(rows, longest_rows))
    if longest_rows:
        print(f"\nThe longest length of each system (doubling from {args.longest_range[0]}):\n"
              + longest_table(longest_rows))
    for r in rows:
        if "profile" in r:
            print("\n" + "\n".join(profile_lines(f"{r['system']} at {r['seq']}", r["profile"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "gpus": args.gpus, "peak_flops": PEAK, "rows": rows,
                       "longest": longest_rows, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
