"""The training loss head alone, forward and backward from the last hidden state: this recipe's chunked cross
entropy (eager and fused) against Liger's fused linear cross entropy, on one GPU.

    python benchmarks/bench_loss.py --model shape:qwen2.5-7b --tokens 16384 --chunks 1024,4096

Each system takes hidden [tokens, H] and the output weight [V, H] of ``--model``'s shape (random) and returns the
mean loss over the tokens; its backward gives both gradients. The weights are float32 under bf16 autocast (the
DDP path and HF + Liger's set-up) or bf16 (``--bf16-weights``: the ZeRO-3 path). Prints, per system and chunk
size (Liger picks its own), the median time of forward + backward, the peak memory above the inputs' and
each result's relative difference from the eager chunks' at the first chunk size. ``--cpu``: a smoke run for
small shapes (float32, no autocast).
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_cepe import timed
from easy_context.hf import models
from easy_context.parallel.loss import chunked_cross_entropy

SYSTEMS = ("eager", "fused", "liger")


def liger_loss():
    """Liger's fused linear cross entropy (mean over the tokens), as its ``LigerForCausalLM`` loss calls it."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda hidden, weight, labels, chunk: loss(weight, hidden, labels)


def ours(fused: bool):
    """This recipe's chunked cross entropy (mean), eager or fused."""
    return lambda hidden, weight, labels, chunk: chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk,
                                                                       reduction="mean", fused=fused)


def run(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, *, steps: int,
        autocast: bool) -> dict:
    """Median seconds of loss + backward over ``steps`` runs after one, the peak bytes above the inputs', and the
    last run's (loss, d hidden, d weight); no peak on the CPU."""
    cuda, last = hidden.is_cuda, {}

    def step():
        last.clear()  # the previous run's gradients are not held through this one
        h, w = (t.detach().requires_grad_() for t in (hidden, weight))
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(h, w, labels, chunk)
        loss.backward()
        last["result"] = (loss.detach(), h.grad, w.grad)
        return loss

    base = torch.cuda.memory_allocated() if cuda else 0
    out = timed(step, warmup=1, steps=steps, cuda=cuda)
    peak = out["peak_gib"] * 2 ** 30 - base if cuda else None
    return {"s": out["step_s"], "peak_bytes": peak, "result": last["result"]}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape:llama3.2-1b", help="a named shape: its hidden size and vocabulary")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--chunks", default="1024", help="comma-separated chunk sizes for this recipe's loss")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--bf16-weights", action="store_true", help="bf16 weights, no autocast (the ZeRO-3 path)")
    p.add_argument("--cpu", action="store_true", help="float32 on the CPU: a smoke run")
    p.add_argument("--json", default=None, help="write the rows here (the table goes to stdout)")
    args = p.parse_args(argv)
    systems = args.systems.split(",")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    chunks = [int(c) for c in args.chunks.split(",")]
    if min(chunks) < 1:
        p.error("--chunks: sizes must be positive")
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA GPU here; pass --cpu for a smoke run")

    config = models.shape_config(args.model)
    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.bfloat16 if args.bf16_weights and not args.cpu else torch.float32
    autocast = not args.cpu and not args.bf16_weights
    g = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(args.tokens, config.hidden_size, device=device, generator=g).to(dtype)
    weight = (torch.randn(config.vocab_size, config.hidden_size, device=device, generator=g)
              / config.hidden_size ** 0.5).to(dtype)
    labels = torch.randint(config.vocab_size, (args.tokens,), device=device, generator=g)

    rows, reference = [], None
    for system in systems:
        for chunk in (chunks if system != "liger" else [0]):
            row = {"system": system, "chunk": chunk or None}
            try:
                loss_fn = liger_loss() if system == "liger" else ours(system == "fused")
                out = run(loss_fn, hidden, weight, labels, chunk, steps=args.steps, autocast=autocast)
            except Exception as e:  # a peer that cannot run here is a row that says why
                rows.append({**row, "failed": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            result = out.pop("result")
            reference = reference or result
            rows.append({**row, **out, "diff": [rel_diff(a, b) for a, b in zip(result, reference)]})

    print(f"{args.model}: {args.tokens} tokens, vocabulary {config.vocab_size}, hidden {config.hidden_size}, "
          f"{'bf16 weights' if dtype == torch.bfloat16 else 'float32 weights'}{', bf16 autocast' if autocast else ''}")
    print("| system | chunk | ms | peak GiB above inputs | loss, d hidden, d weight vs first row |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['system']} | {r['chunk'] or 'own'} | failed: {r['failed']} | | |")
            continue
        diffs = ", ".join(f"{d:.1e}" for d in r["diff"])
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        print(f"| {r['system']} | {r['chunk'] or 'own'} | {1e3 * r['s']:.1f} | {peak} | {diffs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tokens": args.tokens, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
