"""Peak memory, step time and exactness of easy_context's memory options on one GPU, in a Llama-3-8B-shaped model.

    python benchmarks/check_memory_options_gpu.py                       # 4 layers, 64K tokens, bf16
    python benchmarks/check_memory_options_gpu.py --seq 131072 --layers 2

Options, each on top of plain (non-reentrant) gradient checkpointing: none, the tiled MLP, offloaded checkpoint
inputs, both. Each runs on a fresh model from the same seed, through easy_context's chunked loss (no [S, vocab]
logits). Exits non-zero unless every check passes:

1. float32 at --check-seq tokens, TF32 off: every option's loss (1e-6) and every parameter gradient (1e-5,
   relative) match plain checkpointing.
2. bf16 at --seq tokens: one step compared with plain checkpointing, then --steps timed steps with their peak
   allocated GPU memory and peak pinned host memory. The tiled MLP sums each MLP weight gradient over the tiles in
   bf16 (one rounding per tile), and attention backward kernels need not be deterministic, so the bf16 check is
   that every option's worst gradient error stays below the bf16 noise floor: the error of plain bf16 against
   float32 at --check-seq.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
import transformers

from easy_context import apply_tiled_mlp, causal_lm_loss, enable_offloaded_checkpointing, shift_labels

OPTIONS = {"checkpointing": (False, False), "tiled_mlp": (True, False), "offload": (False, True),
           "tiled_mlp+offload": (True, True)}
SHAPES = {  # "tiny" only checks that the script runs (e.g. --device cpu)
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512),
}
GiB = 1 << 30


def build(a, seq: int, dtype: torch.dtype, tiled: bool, offload: bool):
    cfg = transformers.LlamaConfig(**SHAPES[a.shape], num_hidden_layers=a.layers, rope_theta=500000.0,
                                   max_position_embeddings=max(seq, 8192), attn_implementation="sdpa",
                                   use_cache=False)
    torch.manual_seed(0)
    with torch.device(a.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    if offload:
        enable_offloaded_checkpointing(model)
    else:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if tiled:
        apply_tiled_mlp(model, tile_tokens=a.tile)
    return model.train()


def batch(a, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(SHAPES[a.shape]["vocab_size"], (1, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    return ids.to(a.device), shift_labels(labels).to(a.device)


def step(model, ids, targets) -> float:
    loss = causal_lm_loss(model, ids, targets)
    loss.loss.backward()
    return loss.value.item()


def cpu_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()}


def worst_error(model, ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ||grad - ref|| / ||ref|| over the parameters (in float64, one parameter at a time), and where."""
    worst, where = -1.0, ""
    for n, p in model.named_parameters():
        r = ref[n].to(p.device, torch.float64)
        err = ((p.grad.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, where = err, n
    return worst, where


def release(a) -> None:
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def check_float32(a) -> tuple[float, bool]:
    """Check 1; returns the bf16 noise floor (plain bf16 against float32) at --check-seq."""
    set_tf32(False)
    ids, targets = batch(a, a.check_seq)
    ok, truth, truth_loss = True, None, None
    for name, (tiled, offload) in OPTIONS.items():
        model = build(a, a.check_seq, torch.float32, tiled, offload)
        loss = step(model, ids, targets)
        if truth is None:
            truth, truth_loss = cpu_grads(model), loss
            print(f"float32 S={a.check_seq:<7d} {name:18s} loss {loss:.6f}", flush=True)
        else:
            err, where = worst_error(model, truth)
            passed = abs(loss - truth_loss) <= 1e-6 * abs(truth_loss) and err <= 1e-5
            ok &= passed
            print(f"float32 S={a.check_seq:<7d} {name:18s} loss {loss:.6f}  worst grad rel err {err:.2e} ({where})"
                  f"  {'OK' if passed else 'FAIL'}", flush=True)
        del model
        release(a)
    set_tf32(True)
    model = build(a, a.check_seq, torch.bfloat16, False, False)
    step(model, ids, targets)
    floor, where = worst_error(model, truth)
    print(f"bf16    S={a.check_seq:<7d} {'checkpointing':18s} vs float32: worst grad rel err {floor:.2e} ({where}) "
          "= the bf16 noise floor", flush=True)
    del model
    release(a)
    return floor, ok


def memory_stats(a) -> tuple[int, float]:
    if a.device != "cuda":
        return 0, float("nan")
    stats = getattr(torch.cuda, "host_memory_stats", None)
    host = stats().get("allocated_bytes.peak", float("nan")) if stats else float("nan")
    return torch.cuda.max_memory_allocated(), host / GiB


def reset_memory_stats(a) -> int:
    if a.device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()
    return torch.cuda.memory_allocated()


def check_bf16(a, floor: float) -> bool:
    """Check 2, with the memory and time of each option."""
    ids, targets = batch(a, a.seq)
    ok, ref, ref_name = True, None, None
    for name in a.options.split(","):
        tiled, offload = OPTIONS[name]
        model = build(a, a.seq, torch.bfloat16, tiled, offload)
        loss = step(model, ids, targets)
        if ref is None:
            ref, ref_name, verdict = cpu_grads(model), name, "reference"
        else:
            err, where = worst_error(model, ref)
            passed = err <= floor
            ok &= passed
            verdict = f"worst grad rel err vs {ref_name} {err:.2e} ({where}) {'OK' if passed else 'FAIL'}"
        model.zero_grad(set_to_none=True)
        weights = reset_memory_stats(a)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(model, ids, targets)
            model.zero_grad(set_to_none=True)
        if a.device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.steps
        peak, host = memory_stats(a)
        print(f"bf16    S={a.seq:<7d} {name:18s} peak {peak / GiB:6.2f} GiB ({(peak - weights) / GiB:6.2f} above the "
              f"weights)  pinned host peak {host:6.2f} GiB  step {dt:7.3f} s  loss {loss:.5f}  {verdict}", flush=True)
        del model
        release(a)
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=65536)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tile", type=int, default=None, help="tiled MLP tokens per tile (default: the hidden size)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--check-seq", type=int, default=8192)
    p.add_argument("--options", default=",".join(OPTIONS), help="comma-separated; the first is the reference")
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(f"{name}  torch {torch.__version__}  transformers {transformers.__version__}  shape {a.shape}  "
          f"layers {a.layers}", flush=True)
    floor, ok = check_float32(a)
    ok &= check_bf16(a, floor)
    print("ALL OK" if ok else "FAILED (see above)", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
