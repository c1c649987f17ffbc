"""Longest sequence for one full training step (forward, backward, optimizer) of the recipe, and its memory.

  python benchmarks/bench_memory.py --gpus 2 --model shape:llama3-8b --lengths 262144,524288,1048576 \
      --options "plain=;tiled=--tiled-mlp 4096;tiled+offload=--tiled-mlp 4096 --offload-activations"

Each (option set, length) launches train.py (accelerate, DeepSpeed config ``--config``) for ``--steps`` steps
on random tokens; a run that fails (out of memory, or over ``--timeout``) ends that option's sweep.
``--search START,STOP,STEP`` sweeps lengths upward instead. Prints peak GPU memory (torch allocator, rank 0:
allocated and reserved), host RSS per rank at the step's end and its peak, and the step time; writes
``--json`` and a length-vs-peak-memory plot ``--plot``; ``--from-json`` re-plots earlier ``--json`` files together.
``--emulate`` runs rank 0 of ``--gpus`` on one GPU (benchmarks/emulate_rank.py): the same allocations, no
communication.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import run  # noqa: E402


def parse_options(text: str) -> list[tuple[str, list[str]]]:
    """"name=flags;name=flags" -> [(name, [flags])]."""
    out = []
    for item in filter(None, text.split(";")):
        name, _, flags = item.partition("=")
        out.append((name.strip(), flags.split()))
    return out


def failure(tail: str) -> str:
    if re.search(r"out of memory|OutOfMemoryError|CUDA error: out of memory", tail):
        return "OOM"
    if "timeout after" in tail:
        return "timeout"
    if re.search(r"Killed|exitcode\s*:\s*-9|SIGKILL", tail):
        return "killed (host memory?)"
    return "error"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--model", default="shape:llama3-8b")
    p.add_argument("--backend", default="zigzag_ring")
    p.add_argument("--config", default="zero3_offload")
    p.add_argument("--lengths", default="262144,524288,1048576")
    p.add_argument("--search", default=None, help="START,STOP,STEP: sweep up until the first failure")
    p.add_argument("--options", default="tiled+offload=--tiled-mlp 4096 --offload-activations")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=590)
    p.add_argument("--emulate", action="store_true", help="run rank 0 of --gpus on one GPU "
                   "(benchmarks/emulate_rank.py): its memory; the step time is compute only")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", default=None, metavar="A.json,B.json",
                   help="run nothing: merge the rows of earlier --json files into one table and --plot")
    args = p.parse_args()
    if args.from_json:
        loaded = [json.load(open(path)) for path in args.from_json.split(",")]
        rows = [r for d in loaded for r in d["rows"]]
        print_table(rows)
        if args.plot:
            plot(rows, args.plot, title(loaded[0]["model"], loaded[0]["gpus"], loaded[0].get("emulated", False)))
        return
    if args.search:
        start, stop, step = map(int, args.search.split(","))
        lengths = list(range(start, stop + 1, step))
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for name, flags in parse_options(args.options):
        for seq in lengths:
            r = run(args.gpus, args.config, args.model, seq, args.backend, args.steps, flags, args.timeout,
                    emulate=args.emulate)
            row = {"option": name, "flags": " ".join(flags), "seq": seq, "ok": bool(r["records"]), "cmd": r["cmd"],
                   "emulated": args.emulate}
            if r["records"]:
                last = r["records"][-1]
                row.update(step_s=last["step_s"], loss=last["loss"], **{
                    key: max(x.get(key, 0.0) for x in r["records"])
                    for key in ("peak_gpu_gib", "reserved_gpu_gib", "split_free_gpu_gib", "alloc_retries",
                                "cached_gpu_gib_compute", "cached_gpu_gib_other_streams", "host_rss_gib",
                                "host_peak_gib")})
            else:
                row.update(failure=failure(r["tail"]), tail=r["tail"][-1500:])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("cmd", "tail")}), flush=True)
            if not r["records"]:
                break
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "gpus": args.gpus, "config": args.config, "emulated": args.emulate,
                   "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, title(args.model, args.gpus, args.emulate))


def title(model: str, gpus: int, emulated: bool) -> str:
    where = f"rank 0 of {gpus} emulated on one GPU" if emulated else f"on {gpus} GPUs"
    return f"{model} {where}, one training step"


def print_table(rows: list[dict]) -> None:
    print("\n| option | S | step s | peak GPU GiB (reserved) | host RSS GiB/rank (peak) | result |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(f"| {r['option']} | {r['seq']} | {r['step_s']:.1f} | {r['peak_gpu_gib']:.1f} "
                  f"({r['reserved_gpu_gib']:.1f}) | {r['host_rss_gib']:.1f} ({r['host_peak_gib']:.1f}) | ok |")
        else:
            print(f"| {r['option']} | {r['seq']} | | | | {r['failure']} |")


def plot(rows: list[dict], path: str, title: str) -> None:
    """Peak allocated (filled) and reserved (hollow) GPU memory against length, one series per option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["option"] for r in rows):
        ok = [r for r in rows if r["option"] == name and r["ok"]]
        if not ok:
            continue
        xs = [r["seq"] / 1024 for r in ok]
        line, = ax.plot(xs, [r["peak_gpu_gib"] for r in ok], marker="o", label=f"{name}: allocated")
        ax.plot(xs, [r["reserved_gpu_gib"] for r in ok], marker="o", ls="--", mfc="none", color=line.get_color(),
                label=f"{name}: reserved")
        for x, r in zip(xs, ok):
            ax.annotate(f"{r['step_s']:.0f} s/step", (x, r["peak_gpu_gib"]), textcoords="offset points",
                        xytext=(6, -12), fontsize=8)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sequence length (K tokens, whole sequence over all GPUs)")
    ax.set_ylabel("peak GPU memory per GPU (GiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
