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

import torch
from bench_train import error_lines, run


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
    p.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory, drawn as a line in the plot "
                   "(default: this machine's GPU, or what the --from-json files recorded)")
    p.add_argument("--from-json", default=None, metavar="A.json,B.json",
                   help="run nothing: merge the rows of earlier --json files into one table and --plot")
    args = p.parse_args()
    if args.from_json:
        loaded = [json.load(open(path)) for path in args.from_json.split(",")]
        rows = latest_rows([dict(r, emulated=r.get("emulated", d.get("emulated", False)))
                            for d in loaded for r in d["rows"]])
        print_table(rows)
        if args.plot:
            kinds = {r["emulated"] for r in rows}
            gpu_gib = args.gpu_gib or max((d.get("gpu_gib") or 0 for d in loaded), default=0) or None
            plot(rows, args.plot, title(loaded[0]["model"], loaded[0]["gpus"], kinds.pop() if len(kinds) == 1
                                        else None), gpu_gib)
        return
    if args.search:
        start, stop, step = map(int, args.search.split(","))
        lengths = list(range(start, stop + 1, step))
    else:
        lengths = [int(x) for x in args.lengths.split(",")]
    gpu_gib = args.gpu_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30
                                if torch.cuda.is_available() else None)
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
                                "host_peak_gib", "pinned_host_gib", "pinned_host_peak_gib")})
            else:
                row.update(failure=failure(r["tail"]), tail=r["tail"])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("cmd", "tail")}), flush=True)
            if not row["ok"]:
                print("\n".join(error_lines(r["tail"])) or r["tail"][-800:], flush=True)
            if args.json:  # after every row: a sweep cut off (a device's time limit) keeps what it measured
                save(args.json, {"model": args.model, "gpus": args.gpus, "config": args.config,
                                 "emulated": args.emulate, "gpu_gib": gpu_gib, "rows": rows})
            if not r["records"]:
                break
    print_table(rows)
    if args.plot:
        plot(rows, args.plot, title(args.model, args.gpus, args.emulate), gpu_gib)


def save(path: str, content: dict) -> None:
    """Write ``content`` as JSON through a temporary file, so ``path`` is always a whole earlier or later table."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)


def title(model: str, gpus: int, emulated: bool | None) -> str:
    """``emulated``: True, False, or None for a plot that mixes emulated and real runs."""
    where = {True: f"rank 0 of {gpus} emulated on one GPU", False: f"on {gpus} GPUs",
             None: f"on {gpus} GPUs (real) and rank 0 of {gpus} emulated on one GPU"}[emulated]
    return f"{model}, one training step\n{where}"


def print_table(rows: list[dict]) -> None:
    print("\n| option | S | step s | peak GPU GiB (reserved) | host RSS GiB/rank (peak) | result |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(f"| {r['option']} | {r['seq']} | {r['step_s']:.1f} | {r['peak_gpu_gib']:.1f} "
                  f"({r['reserved_gpu_gib']:.1f}) | {r['host_rss_gib']:.1f} ({r['host_peak_gib']:.1f}) | ok |")
        else:
            print(f"| {r['option']} | {r['seq']} | | | | {r['failure']} |")


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per (option, length, real or emulated): a later file's measurement of a point replaces an
    earlier one's (a run repeated to get its failure message, or one cut off and rerun), in first-seen order."""
    latest: dict[tuple, dict] = {}
    for r in rows:  # a key assigned again keeps its first position
        latest[(r["option"], r["seq"], r["emulated"])] = r
    return list(latest.values())


def plot(rows: list[dict], path: str, title: str, gpu_gib: float | None = None) -> None:
    """Peak allocated (filled) and reserved (hollow) GPU memory against length, one series per option (and per
    real/emulated where both are present); a failed length is an x on the GPU's capacity line ``gpu_gib``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    emulated = [bool(r.get("emulated")) for r in rows]
    mixed = len(set(emulated)) > 1
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if gpu_gib:
        ax.axhline(gpu_gib, color="gray", lw=1)
        ax.annotate(f"GPU memory {gpu_gib:.0f} GiB", (0, gpu_gib), textcoords="offset points", xytext=(4, 3),
                    fontsize=8, color="gray")
    failed = []
    keys = [(r["option"], e) for r, e in zip(rows, emulated)]
    for key in dict.fromkeys(keys):
        name = f"{key[0]} ({'emulated' if key[1] else 'real'})" if mixed else key[0]
        real = mixed and not key[1]  # drawn as larger squares beside the emulated series
        mine = [r for r, k in zip(rows, keys) if k == key]
        ok = [r for r in mine if r["ok"]]
        failed += [(name, r) for r in mine if not r["ok"]]
        if not ok:
            continue
        xs = [r["seq"] / 1024 for r in ok]
        line, = ax.plot(xs, [r["peak_gpu_gib"] for r in ok], marker="s" if real else "o",
                        ms=8 if real else 5, label=f"{name}: allocated")
        ax.plot(xs, [r["reserved_gpu_gib"] for r in ok], marker="o", ls="--", mfc="none", color=line.get_color(),
                label=f"{name}: reserved")
        for x, r in zip(xs, ok):
            ax.annotate(f"{r['step_s']:.0f} s", (x, r["peak_gpu_gib"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=7)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], (gpu_gib or 0) * 1.08))
    for name, r in failed:
        y = gpu_gib or ax.get_ylim()[1]
        ax.plot([r["seq"] / 1024], [y], marker="x", ms=10, mew=2, color="red", ls="none")
        ax.annotate(f"{name}: {r.get('failure', 'failed')}", (r["seq"] / 1024, y), textcoords="offset points",
                    xytext=(-60, 6), fontsize=7, color="red")
    ax.set_xlabel("sequence length (K tokens, whole sequence over all GPUs)")
    ax.set_ylabel("peak GPU memory per GPU (GiB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
