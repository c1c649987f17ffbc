"""Run train.py with torch.profiler over one optimizer step and sum the GPU time by kind of kernel.

  accelerate launch ... benchmarks/profile_step.py --step 4 --out prof.json -- <train.py flags>

The profiler starts at the forward of step ``--step`` and stops when train.py logs that step, so the window
is exactly one step: forward, backward (with the checkpoint recompute), ZeRO-3 gathers and reduce-scatters,
optimizer. Each rank writes ``OUT`` with its rank before the suffix (``prof.rank0.json``): the step's wall
time, per kind the summed kernel time and its union over streams, the time no compute kernel ran, the kernels
and the aten ops (with input shapes, by self GPU time) that took the most time.
Use the last step: stopping the profiler takes seconds, which would land in the next step's time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# first match wins: attention kernels (cuDNN, flash, efficient) before the generic GEMM names
KINDS = [("nccl", r"nccl"), ("attention", r"fmha|flash|attention|sdpa|cudnn"),
         ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_"), ("optimizer", r"adam|multi_tensor"),
         ("memcpy", r"^memcpy|^memset")]


def kind(name: str) -> str:
    """The kind of a GPU kernel by its name: one of KINDS' names, else "other"."""
    low = name.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(kernels: list[tuple[str, float, float]], wall_s: float) -> dict:
    """Per kind: summed kernel seconds, the union of their intervals, count; plus the seconds in which no
    compute kernel (anything but NCCL) ran. ``kernels``: (name, start_us, end_us)."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for name, a, b in kernels:
        by_kind.setdefault(kind(name), []).append((a, b))
    kinds = {k: {"sum_s": sum(b - a for a, b in v) / 1e6, "union_s": union_us(v) / 1e6, "count": len(v)}
             for k, v in sorted(by_kind.items())}
    compute = [iv for k, v in by_kind.items() if k != "nccl" for iv in v]
    busy = union_us(compute) / 1e6
    return {"wall_s": wall_s, "compute_busy_s": busy, "no_compute_s": wall_s - busy, "kinds": kinds}


def idle_gaps(kernels: list[tuple[str, float, float]], n: int = 8) -> list[dict]:
    """The ``n`` longest stretches between compute kernels (NCCL aside) with none running: seconds, the kernel
    that ended before and the one that started after (where the GPU waited on the host)."""
    compute = sorted((a, b, name) for name, a, b in kernels if kind(name) != "nccl")
    if not compute:
        return []
    gaps, (_, end, last) = [], compute[0]
    for a, b, name in compute[1:]:
        if a > end:
            gaps.append({"s": (a - end) / 1e6, "after": last[:80], "before": name[:80]})
        if b > end:
            end, last = b, name
    return sorted(gaps, key=lambda g: -g["s"])[:n]


def top_kernels(kernels: list[tuple[str, float, float]], n: int = 30) -> list[dict]:
    """The ``n`` kernel names with the most summed seconds: name (cut to 120 characters), kind, seconds, count."""
    by_name: dict[str, list[float]] = {}
    for name, a, b in kernels:
        acc = by_name.setdefault(name, [0.0, 0])
        acc[0] += (b - a) / 1e6
        acc[1] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:n]
    return [{"name": name[:120], "kind": kind(name), "sum_s": t, "count": c} for name, (t, c) in top]


def top_ops(prof, n: int = 30) -> list[dict]:
    """The ``n`` (aten op, input shapes) pairs with the most self GPU time: which code the kernels came from.
    Only dispatcher ops ("namespace::name") count: kernels and profiler markers ("Command Buffer Full") do not."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0 and "::" in e.key and " " not in e.key:
            rows.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "self_s": t / 1e6, "count": e.count})
    return sorted(rows, key=lambda r: -r["self_s"])[:n]


def python_stack(event, depth: int) -> list[str]:
    """The innermost ``depth`` Python frames (``file.py(line): function``) that called a profiled op: from the
    event's own stack where the profiler filled it, else from its Python-function parents (newer PyTorch)."""
    if event.stack:
        return list(event.stack[:depth])
    frames, parent = [], event.cpu_parent
    while parent is not None and len(frames) < depth:
        if ".py(" in parent.name or parent.name.startswith("<string>("):
            frames.append(parent.name)
        parent = parent.cpu_parent
    return frames


def top_op_stacks(prof, ops: tuple[str, ...] = ("aten::copy_", "aten::add", "aten::add_"), n: int = 20,
                  depth: int = 8) -> list[dict]:
    """The ``n`` (op in ``ops``, input shapes, Python call stack) triples with the most self GPU time (CPU time
    without a GPU): which lines cause the layout copies. Needs a profile taken with ``with_stack=True`` (and
    ``record_shapes=True`` for the shapes)."""
    acc: dict[tuple, list] = {}
    for e in prof.events():
        if e.name not in ops:
            continue
        t = e.self_device_time_total if torch.cuda.is_available() else e.self_cpu_time_total
        shapes = str(e.input_shapes)[:160]
        row = acc.setdefault((e.name, shapes, tuple(python_stack(e, depth))), [0.0, 0])
        row[0] += t
        row[1] += 1
    rows = [{"op": op, "shapes": shapes, "self_s": t / 1e6, "count": c, "stack": list(stack)}
            for (op, shapes, stack), (t, c) in acc.items() if t > 0]
    return sorted(rows, key=lambda r: -r["self_s"])[:n]


def step_profiler(stacks: bool = False) -> torch.profiler.profile:
    """A torch.profiler over the CPU and, where there is one, the GPU, recording input shapes (and, with ``stacks``,
    Python stacks); started and stopped by the caller around one step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, record_shapes=True, with_stack=stacks)


def profile_record(prof, step: int, wall_s: float, stacks: bool = False) -> dict:
    """What a profiled step writes: its number, ``summarize``'s figures, the top kernels and aten ops (and, with
    ``stacks``, the op stacks) of a stopped torch.profiler ``prof``."""
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type != torch.autograd.DeviceType.CPU]
    return {"step": step, **summarize(kernels, wall_s), "gaps": idle_gaps(kernels), "top_kernels": top_kernels(kernels),
            "top_ops": top_ops(prof),
            **({"op_stacks": top_op_stacks(prof)} if stacks else {})}


def profile_lines(title: str, profile: dict) -> list[str]:
    """A profile record as report lines: the wall time, each kind's time, the top kernels and aten ops."""
    lines = [f"profile of step {profile['step']}, {title}: wall {profile['wall_s']:.3f} s, no compute kernel "
             f"running {profile['no_compute_s']:.3f} s"]
    for k, v in profile["kinds"].items():
        lines.append(f"  {k:10s} {v['union_s']:8.3f} s (kernels summed {v['sum_s']:.3f} s, {v['count']} calls)")
    lines.append("  longest stretches with no compute kernel (s, the kernel before -> the one after):")
    lines += [f"    {g['s']:7.4f} {g['after']} -> {g['before']}" for g in profile.get("gaps", [])]
    lines.append("  top kernels (summed s, calls, kind, name):")
    lines += [f"    {t['sum_s']:7.3f} {t['count']:6d} {t['kind']:9s} {t['name']}"
              for t in profile.get("top_kernels", [])]
    lines.append("  top aten ops by self GPU time (s, calls, op, input shapes):")
    lines += [f"    {t['self_s']:7.3f} {t['count']:6d} {t['op']} {t['shapes']}" for t in profile.get("top_ops", [])]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=int, required=True, help="optimizer step to profile (1-based; use the last)")
    p.add_argument("--out", required=True, help="JSON path; each rank inserts .rankN before the suffix")
    p.add_argument("--stacks", action="store_true", help="also record Python stacks (slower CPU side) and "
                   "list which lines the copy/add ops with the most GPU time come from")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    args = p.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    from easy_context.hf import causal_lm as hf
    from easy_context.train.run_log import RunLog

    prof = step_profiler(args.stacks)
    forwards, started = [0], [0.0]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_forward(module, inputs):
        if isinstance(module, hf.CausalLMWithLoss):
            forwards[0] += 1
            if forwards[0] == args.step:
                sync()
                started[0] = time.perf_counter()
                prof.start()

    write = RunLog.write

    def on_log(self, record):
        if record["step"] == args.step and started[0]:
            sync()
            wall = time.perf_counter() - started[0]
            prof.stop()
            rank = int(os.environ.get("RANK", "0"))
            root, ext = os.path.splitext(args.out)
            with open(f"{root}.rank{rank}{ext or '.json'}", "w") as f:
                json.dump({**profile_record(prof, args.step, wall, args.stacks), "rank": rank}, f, indent=1)
        return write(self, record)

    torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    RunLog.write = on_log
    sys.argv = [os.path.join(REPO, "train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
