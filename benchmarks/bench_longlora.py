"""Peak memory and step time of full fine-tuning vs LongLoRA (S²-Attn + LoRA+) on one GPU, Llama-2-7B shapes.

    python benchmarks/bench_longlora.py --seqlens 8192,32768                 # 32 layers: full FT may OOM
    python benchmarks/bench_longlora.py --seqlens 8192,32768 --layers 8      # every config fits; per-layer scaling
    python benchmarks/bench_longlora.py --tiny --device cpu                  # smoke test of the script itself

Random-init Llama-2-7B-shaped decoder (hidden 4096, 32 heads, MLP 11008, vocab 32000), bf16 weights, batch 1,
gradient checkpointing (non-reentrant), chunked loss (no [S, vocab] logits), fused AdamW. One step = forward,
backward and optimizer step. Configs: ``full`` (all weights train, full causal attention), ``lora`` (LoRA+,
full attention), ``s2`` (full FT, S²-Attn), ``lora_s2`` (LongLoRA: LoRA+ and S²-Attn). Full attention and
S²-Attn run on the same easy_context kernel (cuDNN on Hopper), so only the attention pattern differs.

Honesty notes, printed with the table: weights and AdamW states are pure bf16 (no fp32 master copy), i.e.
8 bytes per trainable parameter of optimizer-side state; full FT of 7B with fp32 master weights + fp32
AdamW (16 bytes/param, 112 GB) does not fit one GPU, and LongLoRA's 46.3 GB -> 25.6 GB (8K) was measured
with DeepSpeed ZeRO-2 over 8 GPUs. A config that does not fit prints OOM. With ``--layers N`` < 32 the
figures are for an N-layer model; the "static" column (weights + optimizer state at step start) and the
per-layer activation cost let one extrapolate.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import time

import torch

from easy_context import apply_lora_plus, apply_s2attn, apply_seq_parallel_monkey_patch, causal_lm_loss

CONFIGS = ("full", "lora", "s2", "lora_s2")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)


def build(config_name: str, layers: int, max_len: int, device: str, dtype: torch.dtype, shapes: dict, ratio: float):
    """A random-init Llama with the config's attention and trainable set, and its optimizer."""
    import transformers

    config = transformers.LlamaConfig(**shapes, num_hidden_layers=layers, max_position_embeddings=max_len,
                                      use_cache=False, attention_dropout=0.0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config_name.startswith("lora"):
        apply_lora_plus(model, r=8, alpha=16)
    if config_name.endswith("s2"):
        apply_s2attn(model, ratio=ratio)
    else:
        apply_seq_parallel_monkey_patch("ring", model)  # one process: the plain kernel, no mask
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x spelling
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    return model, opt, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def check_s2_kernel(device: str, dtype: torch.dtype) -> float:
    """Worst relative error of S²-Attn (out, dq, dk, dv) on the automatic kernel vs the reference kernel in
    float32 on the same inputs; raises if it is not within bf16 rounding (the grouped strided views reach
    the fused kernels only on a GPU)."""
    from easy_context import s2_attention

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dout = (torch.randn(2, 8, 2048, 128, generator=g).to(device) for _ in range(4))
    k, v = k[:, :4], v[:, :4]
    # [B, S, H, D] memory as in a transformers model.
    q, dout = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, dout))
    results = []
    for kernel, dt in ((None, dtype), ("reference", torch.float32)):
        leaves = [x.detach().to(dt).requires_grad_(True) for x in (q, k, v)]
        out = s2_attention(*leaves, kernel=kernel)
        out.backward(dout.to(dt))
        results.append([out.float()] + [x.grad.float() for x in leaves])
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(*results))
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    print(f"S²-Attn {dtype} automatic kernel vs float32 reference: worst relative error {err:.1e} (tolerance {tol})")
    if not err < tol:
        raise SystemExit("S²-Attn on this GPU's kernel is wrong; not benchmarking it")
    return err


def measure(model, opt, seq: int, device: str, warmup: int, iters: int, vocab: int) -> dict:
    """Median step time (ms) and peak/static memory (GB) of ``iters`` steps after ``warmup`` steps."""
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(vocab, (1, seq), generator=g).to(device)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=device)], 1)
    pos = torch.arange(seq, device=device)[None]
    cuda = device == "cuda"

    def step():
        out = causal_lm_loss(model, ids, targets, pos)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.value

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    times, losses = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(float(step()))
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    ms = sorted(times)[len(times) // 2]
    return dict(step_ms=ms, tokens_per_s=seq / ms * 1e3, peak_gb=peak, reserved_gb=reserved, static_gb=static,
                loss=losses[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B: 32)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument("--ratio", type=float, default=0.25, help="S²-Attn group size / sequence length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, float32: check the script runs (e.g. on CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    seqlens = [int(s) for s in args.seqlens.split(",")]
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    shapes = TINY if args.tiny else LLAMA2_7B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    check_s2_kernel(args.device, dtype)
    rows = []
    for name in configs:
        model = opt = None
        try:
            model, opt, trainable, total = build(name, args.layers, max(seqlens), args.device, dtype, shapes, args.ratio)
        except torch.OutOfMemoryError:
            rows += [dict(config=name, seq=s, result="OOM building the model") for s in seqlens]
            model = opt = None
            gc.collect()
            torch.cuda.empty_cache()
            continue
        for seq in seqlens:
            row = dict(config=name, seq=seq, layers=args.layers, trainable_m=trainable / 1e6, total_m=total / 1e6)
            try:
                row.update(measure(model, opt, seq, args.device, args.warmup, args.iters, shapes["vocab_size"]))
                row["result"] = "ok"
            except torch.OutOfMemoryError:
                row["result"] = "OOM"
            opt.zero_grad(set_to_none=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, opt
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{device_name}, torch {torch.__version__}, {datetime.date.today()}, Llama-2-7B shapes"
          f"{' (TINY)' if args.tiny else ''} with {args.layers} layers, batch 1, {dtype}, gradient checkpointing, "
          f"chunked loss, AdamW with pure-{'fp32' if args.tiny else 'bf16'} states (no fp32 master weights), "
          f"S²-Attn group = {args.ratio} x sequence")
    print("| config | seq | trainable (M) | peak alloc (GB) | peak reserved (GB) | static (GB) | step (ms) | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("result") != "ok":
            print(f"| {r['config']} | {r['seq']} | {r.get('trainable_m', float('nan')):.1f} | {r['result']} | | | | |")
            continue
        print(f"| {r['config']} | {r['seq']} | {r['trainable_m']:.1f} | {r['peak_gb']:.1f} | {r['reserved_gb']:.1f} | "
              f"{r['static_gb']:.1f} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} |")
    print("LongLoRA (paper Fig. 1, 8x A100, ZeRO-2, 8K): full FT 46.3 GB vs S²-Attn + LoRA+ 25.6 GB per GPU")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=device_name, torch=torch.__version__, date=str(datetime.date.today()),
                           args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
