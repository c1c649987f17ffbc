"""Fused pointwise ops: a decoder layer's RMSNorms, SwiGLU product and RoPE, each compiled by torch.compile
into a kernel or two in forward and in backward, instead of the 4-8 memory-bound kernels eager PyTorch runs per
op chain (on a Llama-2-7B layer at 64K tokens on an H200: 50.5 -> 15.8 ms of such kernels per forward+backward,
docs/performance.md). Matmuls and attention are untouched.

Each op is replaced only where the model's own code computes the same function, checked numerically on small
random inputs with the module's own forward (so a Gemma-style ``1 + weight`` norm or a GELU MLP is left alone,
and parameters are never read: it works on ZeRO-3 partitioned models). Same math in the same precision
(float32 norm statistics, the norm's output cast before the weight as transformers does); only the order of
floating-point operations inside a fused kernel may differ.
RoPE is the function the attention module calls from its modeling module (``apply_rotary_pos_emb``), so it is
replaced in that module: every model of the family in the process then uses the compiled one.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from ..attention.compiled import compiled
from ..attention.precision import autocast_dtype

Tensor = torch.Tensor
_ATTR = "_easy_context_fused"


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
          out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    q_rot, k_rot = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    if out_dtype is None:
        return q_rot, k_rot
    return q_rot.to(out_dtype), k_rot.to(out_dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' Llama RMSNorm (float32 statistics, cast back to x's dtype before the weight), compiled."""
    return compiled(_rms_norm)(x, weight, eps)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's pointwise part, silu(gate) * up, compiled."""
    return compiled(_silu_mul)(gate, up)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, **_) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (rotate-half RoPE), compiled. Under autocast its result comes in
    autocast's dtype: the float32 product of bf16 q/k and float32 cos/sin, rounded once in the kernel, as every
    attention would round it (instead of float32 q/k written out, read back and cast, forward and backward)."""
    out_dtype = autocast_dtype(q.device.type)
    if unsqueeze_dim != 1 or cos.dim() != 3:
        return compiled(_rope)(q, k, cos, sin, unsqueeze_dim, out_dtype)
    # q/k [B, H, S, D] are views of [B, S, H, D] projections: the compiled kernels run on those, so their
    # outputs and the gradients they return keep that memory order and the model's transposes and reshapes
    # around them are views, not copies (two full [B, S, H, D] copies per layer otherwise).
    q_rot, k_rot = compiled(_rope)(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2, out_dtype)
    return q_rot.transpose(1, 2), k_rot.transpose(1, 2)


def _norm_forward(self, hidden_states: Tensor) -> Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _same(fn, ref, *shapes: tuple[int, ...]) -> bool:
    """Whether ``fn`` and ``ref`` agree (float32, CPU) on random inputs of ``shapes``; False if either fails."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g) for s in shapes]
    try:
        got, want = fn(*args), ref(*args)
    except Exception:
        return False
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))


def _is_rms_norm(module: torch.nn.Module) -> bool:
    if not (hasattr(module, "weight") and isinstance(getattr(module, "variance_epsilon", None), float)):
        return False
    w = torch.randn(8, generator=torch.Generator().manual_seed(1))
    probe = types.SimpleNamespace(weight=w, variance_epsilon=module.variance_epsilon)
    return _same(lambda x: type(module).forward(probe, x), lambda x: _rms_norm(x, w, probe.variance_epsilon), (3, 8))


def _is_swiglu(module: torch.nn.Module) -> bool:
    if not all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # the probe's own weights; the caller's RNG is kept
        torch.manual_seed(0)
        probe = types.SimpleNamespace(gate_proj=torch.nn.Linear(8, 16), up_proj=torch.nn.Linear(8, 16),
                                      down_proj=torch.nn.Linear(16, 8), act_fn=getattr(module, "act_fn", None))
        return _same(lambda x: type(module).forward(probe, x),
                     lambda x: probe.down_proj(_silu_mul(probe.gate_proj(x), probe.up_proj(x))), (3, 8))


def _is_rope_module(mod) -> bool:
    """Whether the modeling module's ``apply_rotary_pos_emb`` (what its attention calls) is rotate-half RoPE."""
    ref = getattr(mod, "apply_rotary_pos_emb", None)
    if ref is apply_rope:  # already replaced
        return True
    return ref is not None and _same(lambda q, k, c, s: ref(q, k, c, s), lambda q, k, c, s: _rope(q, k, c, s),
                                     (1, 2, 5, 8), (1, 2, 5, 8), (1, 5, 8), (1, 5, 8))


def fuse_pointwise(model: torch.nn.Module, *, required: bool = True) -> dict[str, int]:
    """Replace, in place, every Llama-style RMSNorm's forward with ``rms_norm``, every SwiGLU MLP's with one that
    calls ``silu_mul``, and the RoPE function of each attention's modeling module with ``apply_rope``; returns
    how many of each the model now runs fused ({"rms_norm": n, "swiglu": n, "rope": n}). Applying again changes
    nothing. ValueError, before anything is replaced, if nothing in the model matched and ``required`` (it would
    run unfused while the caller believes otherwise; not required: all counts 0) or if a matching module's forward
    was already wrapped (call this first)."""
    done = [m for m in model.modules() if getattr(m, _ATTR, False)]
    fresh = [m for m in model.modules() if not getattr(m, _ATTR, False)]
    norms, mlps = [m for m in fresh if _is_rms_norm(m)], [m for m in fresh if _is_swiglu(m)]
    # one check per modeling module, not per layer
    attention_modules = {sys.modules.get(type(m).__module__) for m in fresh
                         if hasattr(m, "q_proj") and hasattr(m, "k_proj")}
    ropes = {mod for mod in attention_modules if _is_rope_module(mod)}
    wrapped = [type(m).__name__ for m in norms + mlps if "forward" in vars(m)]
    if wrapped:
        raise ValueError(f"fuse_pointwise: {wrapped[0]}'s forward is already replaced (e.g. by apply_tiled_mlp); "
                         "call fuse_pointwise first, so that the other wrapper calls the fused forward")
    if not (done or norms or mlps or ropes) and required:
        raise ValueError(f"fuse_pointwise: nothing in {type(model).__name__} is a Llama-style RMSNorm, SwiGLU MLP "
                         "or rotate-half RoPE; leave the option off for this model")
    for modules, forward in ((norms, _norm_forward), (mlps, _mlp_forward)):
        for m in modules:
            m.forward = types.MethodType(forward, m)
            setattr(m, _ATTR, True)
    for mod in ropes:
        mod.apply_rotary_pos_emb = apply_rope
    fused = done + norms + mlps
    return {"rms_norm": sum(hasattr(m, "variance_epsilon") for m in fused),
            "swiglu": sum(not hasattr(m, "variance_epsilon") for m in fused), "rope": len(ropes)}
