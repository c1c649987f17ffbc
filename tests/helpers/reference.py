"""Full-sequence attention computed the plain way in float64: the ground truth for every backend."""

from __future__ import annotations

import torch


def full_attention(q, k, v, dout, causal: bool, scale: float | None = None):
    """out, lse, dq, dk, dv (float64) of softmax(q k^T * scale) v on the unsharded [B, H, S, D] inputs."""
    q, k, v, dout = (t.detach().double().requires_grad_(True) for t in (q, k, v, dout))
    n_rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = q @ kk.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ vv
    out.backward(dout.detach())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_full(attn, rank: int, world: int, layout: str, *, causal: bool, heads: int, kv_heads: int,
                       head_dim: int, chunk: int, dtype: torch.dtype, device: str, seed: int,
                       tol: dict[str, float], batch: int = 2, group=None, bshd: bool = False,
                       **attn_kwargs) -> dict[str, float]:
    """Run ``attn`` on this rank's ``layout`` shard of random inputs; assert out/lse/dq/dk/dv match full attention.

    ``attn(q, k, v, causal=..., return_lse=True, group=..., **attn_kwargs)`` is any sequence-parallel
    backend. Inputs are drawn from ``seed`` identically on every rank; ``tol`` maps each of
    out/lse/dq/dk/dv to the largest relative error (||x - ref|| / ||ref||) allowed. ``bshd``: the local
    q/k/v/dout are [B, S, H, D] buffers viewed as [B, H, S, D], as a Hugging Face model hands them over.
    Returns the errors.
    """
    from easy_context.attention.layouts import num_chunks, shard

    seq = chunk * num_chunks(layout, world)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    ref = dict(zip(("out", "lse", "dq", "dk", "dv"), full_attention(q, k, v, dout, causal)))

    def local(t):
        t = shard(t, layout, rank, world, dim=2).to(device=device, dtype=dtype)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if bshd else t

    lq, lk, lv = (local(t).requires_grad_(True) for t in (q, k, v))
    out, lse = attn(lq, lk, lv, causal=causal, return_lse=True, group=group, **attn_kwargs)
    # autograd.grad, not .backward: a leaf's .grad is restrided to the leaf's layout, hiding the backend's own
    dq, dk, dv = torch.autograd.grad(out, (lq, lk, lv), local(dout))
    got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if bshd:  # strided as their inputs: the model's transposes back to [B, S, H * D] then need no copy
        strides = {n: (x.stride(), t.stride()) for n, x, t in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                                                   (lq, lq, lk, lv))}
        assert all(a == b for a, b in strides.values()), f"{layout}: (result, input) strides {strides}"
    errs = {}
    for name, x in got.items():
        r = shard(ref[name], layout, rank, world, dim=2)
        assert x is not None and x.shape == r.shape, f"{name}: shape {None if x is None else x.shape} != {r.shape}"
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        errs[name] = rel_err(x.cpu(), r)
    bad = {n: e for n, e in errs.items() if e > tol[n]}
    assert not bad, (f"rank {rank}/{world} layout={layout} causal={causal} H={heads} H_kv={kv_heads} "
                     f"D={head_dim} {dtype}: relative errors {bad} exceed {tol} (seed {seed})")
    return errs
