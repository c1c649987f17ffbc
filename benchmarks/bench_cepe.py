"""CEPE vs full-attention fine-tuning on one GPU at equal total context: tokens/s and peak memory, and their ratios.

    python benchmarks/bench_cepe.py                                   # H200: Llama-2-7B shape, 8K, 32K, 128K
    python benchmarks/bench_cepe.py --contexts 8192,32768 --modes train --json results/bench_cepe.json
    python benchmarks/bench_cepe.py --smoke                           # tiny shapes, float32, CPU: the script runs

Random-init shapes, nothing downloaded. ``full``: the Llama-2-7B-shaped decoder (bf16) fine-tuned whole on T tokens
through this project's full-attention path (its exact kernel on one rank: cuDNN on Hopper, gradient
checkpointing, the chunked loss: no [T, vocab] logits). ``cepe``: the same decoder frozen, T = a 4096-token window
+ T - 4096 context tokens in 256-token chunks through a 24-layer, 1024-wide encoder (~435M parameters, the paper's)
and cross-attention in all 32 layers (~1.34B); encoder and decoder layers checkpointed. Modes: ``train`` (one
step: forward, backward, fused AdamW step of the trainable parameters; pure bf16 weights and AdamW states, no fp32
master copy, for both) and ``infer`` (forward and loss, no gradient: the LM evaluation the paper's 10x throughput
and 1/6 memory claim is about). tokens/s counts all T tokens; peak memory is the CUDA allocator's peak over the
timed steps, weights and optimizer state included. A config that does not fit prints OOM.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time

import torch

from easy_context import CausalLMWithLoss, apply_seq_parallel_monkey_patch
from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.data import split_rows
from easy_context.cepe.loss import CEPEWithLoss
from easy_context.cepe.model import build_cepe
from easy_context.hf.models import load_model
from easy_context.memory.offload import setup_checkpointing
from easy_context.parallel.inputs import whole_batch

MODES = ("train", "infer")
SMOKE = dict(model="shape:llama2-7b,hidden_size=128,intermediate_size=256,num_hidden_layers=2,num_attention_heads=4,"
                   "num_key_value_heads=4,vocab_size=512", contexts="512,1024", window=256, chunk=64,
             encoder_layers=1, encoder_hidden=64, steps=1, warmup=1)


def timed(step, warmup: int, steps: int, cuda: bool) -> dict:
    """Median seconds of ``steps`` calls of ``step`` after ``warmup`` calls, and the allocator's peak (GiB) over
    the timed ones."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = float(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return dict(step_s=sorted(times)[len(times) // 2], peak_gib=peak, loss=loss)


def make_step(wrapped, args: tuple, mode: str, opt):
    """One step of ``wrapped(*args)``: train (forward, backward, optimizer step) or infer (forward, no gradient)."""
    def step():
        if mode == "infer":
            with torch.no_grad():
                return wrapped(*args)[1]
        loss, value, _ = wrapped(*args)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return value
    return step


def run(method: str, wrapped, params: list, contexts: list[int], modes: list[str], args, device: str,
        vocab: int) -> list[dict]:
    """Every (mode, context) of one method; a fresh fused AdamW over ``params`` for each training config."""
    rows = []
    for mode in modes:
        wrapped.train(mode == "train")
        for total in contexts:
            row = dict(method=method, mode=mode, context=total)
            opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda") if mode == "train" else None
            ids = torch.randint(vocab, (1, total), generator=torch.Generator().manual_seed(total)).to(device)
            try:
                if method == "full":
                    inputs = whole_batch(ids, ids)
                    step_args = (inputs.input_ids, inputs.target_ids, inputs.position_ids)
                else:  # the last window to the decoder, the tokens before it to the encoder
                    batch = split_rows(ids, None, stage="main", window=args.window, chunk_size=args.chunk)
                    inputs = whole_batch(batch.input_ids, batch.input_ids)
                    step_args = (inputs.input_ids, inputs.target_ids, inputs.position_ids, batch.chunk_ids,
                                 batch.chunk_mask)
                step = make_step(wrapped, step_args, mode, opt)
                row.update(timed(step, args.warmup, args.steps, device == "cuda"), result="ok")
                row["tokens_per_s"] = total / row["step_s"]
            except torch.OutOfMemoryError:
                row["result"] = "OOM"
            for p in params:
                p.grad = None
            del opt
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shape:llama2-7b", help="the decoder's shape (shape:NAME[,field=value...])")
    ap.add_argument("--contexts", default="8192,32768,131072", help="total tokens (window + encoder context)")
    ap.add_argument("--window", type=int, default=4096, help="CEPE's decoder window")
    ap.add_argument("--chunk", type=int, default=256, help="CEPE's encoder chunk length")
    ap.add_argument("--encoder-layers", type=int, default=24)
    ap.add_argument("--encoder-hidden", type=int, default=1024)
    ap.add_argument("--methods", default="full,cepe")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per config (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in float32 on the CPU: check the script runs")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_cepe.py measures a CUDA GPU (a 7B-shaped model at up to 128K tokens), and none is "
                         "here: run it on a GPU machine, or pass --smoke for a tiny CPU run of the script")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    contexts = [int(c) for c in args.contexts.split(",")]
    modes = args.modes.split(",")
    bad = [c for c in contexts if c <= args.window or (c - args.window) % args.chunk]
    if bad or set(modes) - set(MODES):
        ap.error(f"every context must exceed --window {args.window} by a multiple of --chunk {args.chunk} "
                 f"(got {bad}); modes are {MODES}")

    torch.manual_seed(0)
    with torch.device(device):
        decoder = load_model(args.model, dtype=dtype, max_position_embeddings=max(contexts))
    vocab = decoder.config.vocab_size
    rows = []
    if "full" in args.methods:
        apply_seq_parallel_monkey_patch("ring", decoder)  # one rank: the project's exact kernel, no mask
        setup_checkpointing(decoder)
        params = list(decoder.parameters())
        rows += run("full", CausalLMWithLoss(decoder), params, contexts, modes, args, device, vocab)
        decoder.set_attn_implementation("sdpa")
    if "cepe" in args.methods:
        cfg = CEPEConfig(chunk_size=args.chunk, encoder_layers=args.encoder_layers,
                         encoder_hidden_size=args.encoder_hidden)
        model = build_cepe(decoder, cfg)  # the decoder frozen; encoder and cross-attention in its dtype
        setup_checkpointing(model.decoder)
        setup_checkpointing(model.encoder.model)
        params = [p for p in model.parameters() if p.requires_grad]
        print(f"CEPE: encoder {sum(p.numel() for p in model.encoder.parameters()) / 1e6:.0f}M, trainable "
              f"{sum(p.numel() for p in params) / 1e6:.0f}M, decoder "
              f"{sum(p.numel() for p in model.decoder.parameters() if not p.requires_grad) / 1e6:.0f}M frozen",
              flush=True)
        rows += run("cepe", CEPEWithLoss(model), params, contexts, modes, args, device, vocab)

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}, {datetime.date.today()}, {args.model}, batch 1, {dtype}; CEPE window "
          f"{args.window} + context in {args.chunk}-token chunks, encoder {args.encoder_layers} x {args.encoder_hidden}")
    print("| mode | total tokens | full tok/s | CEPE tok/s | speedup | full peak GiB | CEPE peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["method"], r["mode"], r["context"]): r for r in rows}
    for mode in modes:
        for c in contexts:
            f, e = by.get(("full", mode, c), {}), by.get(("cepe", mode, c), {})
            cells = []
            for r in (f, e):
                cells += [f"{r['tokens_per_s']:.0f}" if r.get("result") == "ok" else r.get("result", "-")]
            ok = f.get("result") == e.get("result") == "ok"
            speed = f"{e['tokens_per_s'] / f['tokens_per_s']:.1f}x" if ok else "-"
            mem = [f"{r['peak_gib']:.1f}" if r.get("result") == "ok" else r.get("result", "-") for r in (f, e)]
            ratio = f"1/{f['peak_gib'] / e['peak_gib']:.1f}" if ok and e["peak_gib"] > 0 else "-"
            print(f"| {mode} | {c} | {cells[0]} | {cells[1]} | {speed} | {mem[0]} | {mem[1]} | {ratio} |")
    print("The paper (abstract, Llama-2-7B at 128K): 10x the throughput with 1/6 of the memory of full-attention "
          "long-context models.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, date=str(datetime.date.today()), args=vars(args),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
