"""Local (single-device) attention block kernels with a log-sum-exp, the unit every backend is built from.

Contract shared by all kernels, layout ``[batch, heads, seq, head_dim]``:

* ``forward(q, k, v, causal, scale) -> (out, lse)``: ``out`` has q's shape and dtype, ``lse`` is
  float32 (float64 for float64 inputs) ``[B, H, Sq]`` in natural log.
* ``backward(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)``: ``out`` and ``lse`` are the
  *final* merged values over all key blocks, so each block's gradients are exact and simply add up.

``k``/``v`` may have fewer heads than ``q`` (GQA/MQA); ``dk``/``dv`` come back with k/v's head count.
``causal`` means top-left aligned and is only used for square diagonal blocks.

Packed documents (``forward_varlen`` / ``backward_varlen``, same contract plus ``cu_seqlens``): q and k rows are
cut alike into segments ``[cu_seqlens[i], cu_seqlens[i + 1])`` and each segment attends only to itself (causal
inside when ``causal``). The float64 reference and the CPU flash kernel apply a document mask in one call; flash
uses PyTorch's own varlen flash op (``aten._flash_attention_forward`` with cumulative lengths); cuDNN gives long
documents a call of their own and runs of short ones to that varlen op (``CudnnKernel.OWN_CALL_WORK``); any other
kernel runs one call per segment.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import torch

from .head_groups import backward_by_head_groups, forward_by_head_groups
from .precision import accumulation_dtype

Tensor = torch.Tensor

ENV_VAR = "EASY_CONTEXT_KERNEL"


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated for its group of q heads."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sum_kv_groups(dx: Tensor, n_kv_heads: int) -> Tensor:
    """Inverse of ``repeat_kv`` for gradients: [B, Hkv * n_rep, S, D] -> [B, Hkv, S, D] (summed)."""
    b, h, s, d = dx.shape
    if h == n_kv_heads:
        return dx
    return dx.view(b, n_kv_heads, h // n_kv_heads, s, d).sum(2)


class AttentionKernel:
    """Base class: handles GQA by repeating k/v heads and splits long blocks over head groups
    (``head_groups.head_chunks``); subclasses implement single calls on equal-head blocks."""

    name = "base"
    native_gqa = False

    def supports(self, q: Tensor, k: Tensor) -> str | None:
        """None when this kernel can run these inputs, else a reason."""
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        return forward_by_head_groups(self._forward_gqa, q, k, v, causal, scale)

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        return backward_by_head_groups(self._backward_gqa, dout, q, k, v, out, lse, causal, scale)

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Sequence[int], causal: bool,
                       scale: float) -> tuple[Tensor, Tensor]:
        """``forward`` within documents: rows (q and k alike, equal lengths) cut at ``cu_seqlens`` (0, ..., S)."""
        return forward_by_head_groups(self._forward_gqa, q, k, v, causal, scale, tuple(cu_seqlens))

    def backward_varlen(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        cu_seqlens: Sequence[int], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """``backward`` of ``forward_varlen``."""
        return backward_by_head_groups(self._backward_gqa, dout, q, k, v, out, lse, causal, scale, tuple(cu_seqlens))

    def _native_gqa(self, cu_seqlens: tuple[int, ...] | None) -> bool:
        """Whether this call takes k/v with fewer heads than q as they are (else they are repeated to q's)."""
        return self.native_gqa

    def _forward_gqa(self, q, k, v, causal, scale, cu_seqlens=None):
        if not self._native_gqa(cu_seqlens):
            n_rep = q.shape[1] // k.shape[1]
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if cu_seqlens is None:
            return self._forward(q, k, v, causal, scale)
        return self._forward_varlen(q, k, v, cu_seqlens, causal, scale)

    def _backward_gqa(self, dout, q, k, v, out, lse, causal, scale, cu_seqlens=None):
        h_kv, native = k.shape[1], self._native_gqa(cu_seqlens)
        if not native:
            n_rep = q.shape[1] // h_kv
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        if cu_seqlens is None:
            dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, scale)
        else:
            dq, dk, dv = self._backward_varlen(dout, q, k, v, out, lse, cu_seqlens, causal, scale)
        if not native:
            dk, dv = sum_kv_groups(dk, h_kv), sum_kv_groups(dv, h_kv)
        return dq, dk, dv

    def _forward(self, q, k, v, causal, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, causal, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_varlen(self, q, k, v, cu_seqlens, causal, scale):
        # one call per document (kernels without a varlen path)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype), device=q.device)
        for a, b in zip(cu_seqlens, cu_seqlens[1:]):
            out[:, :, a:b], lse[:, :, a:b] = self._forward(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal, scale)
        return out, lse

    def _backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for a, b in zip(cu_seqlens, cu_seqlens[1:]):
            rows = slice(a, b)
            dq[:, :, rows], dk[:, :, rows], dv[:, :, rows] = self._backward(
                dout[:, :, rows], q[:, :, rows], k[:, :, rows], v[:, :, rows], out[:, :, rows], lse[:, :, rows],
                causal, scale)
        return dq, dk, dv

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"


def _causal_mask(sq: int, sk: int, device) -> Tensor:
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()


def document_mask(cu_seqlens: Sequence[int], causal: bool, device=None) -> Tensor:
    """[S, S] bool, True where a query row may see a key column: same segment of ``cu_seqlens`` (and key <= query
    when ``causal``)."""
    lengths = torch.tensor([b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    same = doc[:, None] == doc[None, :]
    return same.tril() if causal else same


def _allowed(q: Tensor, k: Tensor, causal: bool, cu_seqlens) -> Tensor | None:
    if cu_seqlens is not None:
        return document_mask(cu_seqlens, causal, q.device)
    return _causal_mask(q.shape[2], k.shape[2], q.device) if causal else None


class ReferenceKernel(AttentionKernel):
    """Materializes the score matrix in float32 (float64 for float64 inputs); any device, for tests."""

    name = "reference"

    def _scores(self, q, k, causal, scale, cu_seqlens=None):
        ct = accumulation_dtype(q.dtype)
        s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
        allowed = _allowed(q, k, causal, cu_seqlens)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s, ct

    def _forward(self, q, k, v, causal, scale, cu_seqlens=None):
        s, ct = self._scores(q, k, causal, scale, cu_seqlens)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.to(ct))
        return out.to(q.dtype), lse

    def _forward_varlen(self, q, k, v, cu_seqlens, causal, scale):
        return self._forward(q, k, v, causal, scale, cu_seqlens)

    def _backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, causal, scale):
        return self._backward(dout, q, k, v, out, lse, causal, scale, cu_seqlens)

    def _backward(self, dout, q, k, v, out, lse, causal, scale, cu_seqlens=None):
        s, ct = self._scores(q, k, causal, scale, cu_seqlens)
        p = torch.exp(s - lse.to(ct)[..., None])
        do = dout.to(ct)
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.to(ct).transpose(-1, -2))
        delta = (do * out.to(ct)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(ct))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(ct))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CPUFlashKernel(AttentionKernel):
    """PyTorch's fused CPU flash-attention op (float32/float64/bf16 on CPU)."""

    name = "cpu_flash"
    native_gqa = False

    def supports(self, q, k):
        if q.device.type != "cpu":
            return "needs CPU tensors"
        return None

    def _forward(self, q, k, v, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse.to(accumulation_dtype(lse.dtype))

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)

    @staticmethod
    def _additive_mask(q: Tensor, cu_seqlens, causal: bool) -> Tensor:
        allowed = document_mask(cu_seqlens, causal, q.device)
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        return mask[None, None]

    def _forward_varlen(self, q, k, v, cu_seqlens, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=self._additive_mask(q, cu_seqlens, causal), scale=scale)
        return out, lse.to(accumulation_dtype(lse.dtype))

    def _backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), 0.0, False,
            attn_mask=self._additive_mask(q, cu_seqlens, causal), scale=scale)


class _CudaAuxCache:
    """Dropout-free aten backward ops still take rng/cum_seq tensors; we take them from one tiny forward."""

    def __init__(self, fwd: Callable[[Tensor], tuple]):
        self._fwd = fwd
        self._cache: dict = {}

    def get(self, q: Tensor) -> tuple:
        key = (q.device, q.dtype, q.shape[-1])
        if key not in self._cache:
            t = torch.randn(1, 1, 16, q.shape[-1], device=q.device, dtype=q.dtype)
            self._cache[key] = self._fwd(t)
        return self._cache[key]


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_HALF = (torch.bfloat16, torch.float16)


def _cuda_dtype_reason(q: Tensor, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why a CUDA kernel for ``dtypes`` cannot take q (not on CUDA, another dtype), None when it can."""
    if q.device.type != "cuda":
        return "needs CUDA"
    if q.dtype not in dtypes:
        return "needs " + "/".join(_DTYPE_NAMES[d] for d in dtypes)
    return None


def _ampere_head_dim_reason(q: Tensor, max_head_dim: int) -> str | None:
    """Why a flash-style kernel cannot take q on its GPU (before compute capability 8.0, head_dim over
    ``max_head_dim`` or not a multiple of 8), None when it can."""
    if torch.cuda.get_device_capability(q.device)[0] < 8:
        return "needs compute capability >= 8.0"
    if q.shape[-1] > max_head_dim or q.shape[-1] % 8:
        return f"needs head_dim <= {max_head_dim} and a multiple of 8"
    return None


def _bshd(x: Tensor) -> Tensor:
    """Same values as ``x`` [B, H, S, D], stored as [B, S, H, D] in memory."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def strided_like_q(x: Tensor, q: Tensor) -> Tensor:
    """``x`` (O or dO, shaped like q) with exactly q's strides: itself when it has them, else a copy.

    PyTorch caches each cuDNN backward graph under q/k/v's sizes and strides only, but the graph also
    bakes in O's and dO's strides. A later call with the same q/k/v and O/dO strided otherwise would
    run the cached graph on them and return wrong gradients without an error (seen on H200 with torch
    2.11: a second sequence-parallel backend in one process got 0.5 relative gradient error). Tying
    O/dO's strides to q's makes the cache key decide the whole graph.
    """
    if x.shape != q.shape:  # head_dim of v differs from q's: one fixed layout still decides the graph
        return x.contiguous()
    if x.stride() == q.stride():
        return x
    return torch.empty_strided(q.shape, q.stride(), dtype=x.dtype, device=x.device).copy_(x)


@functools.lru_cache(maxsize=256)
def _batch_cu_seqlens(cu_seqlens: tuple[int, ...], batch: int, seq: int, device: torch.device) -> Tensor:
    """int32 cumulative lengths of ``batch`` rows of ``seq`` tokens, each cut at ``cu_seqlens``, rows back to back:
    what the varlen flash op reads."""
    starts = [r * seq + c for r in range(batch) for c in cu_seqlens[:-1]] + [batch * seq]
    return torch.tensor(starts, dtype=torch.int32, device=device)


def _tokens(x: Tensor) -> Tensor:
    """[B, H, S, D] -> [B * S, H, D] (a view of a [B, S, H, D] buffer)."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def _untokens(x: Tensor, batch: int) -> Tensor:
    """Inverse of ``_tokens``: [B * S, H, D] -> [B, H, S, D]."""
    t, h, d = x.shape
    return x.view(batch, t // batch, h, d).transpose(1, 2)


def _flash_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: tuple[int, ...], causal: bool,
                          scale: float | None) -> tuple:
    """``aten._flash_attention_forward`` over documents: the raw result (out [T, H, D], lse [H, T], rng, unused)."""
    cu = _batch_cu_seqlens(cu_seqlens, q.shape[0], q.shape[2], q.device)
    longest = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:]))
    return torch.ops.aten._flash_attention_forward(_tokens(q), _tokens(k), _tokens(v), cu, cu, longest, longest, 0.0,
                                                   causal, False, scale=scale)


class CudnnKernel(AttentionKernel):
    """cuDNN fused attention through ``aten._scaled_dot_product_cudnn_attention`` (fastest on Hopper); from torch
    2.8 it takes GQA's k/v heads as they are (each serves its group of q heads, gradients summed in the kernel)."""

    name = "cudnn"
    native_gqa = torch.__version__ >= "2.8"  # dense blocks only: document runs may go to flash's varlen op

    def __init__(self):
        self._aux = _CudaAuxCache(lambda t: torch.ops.aten._scaled_dot_product_cudnn_attention(
            t, t, t, None, True, 0.0, False, False))

    def supports(self, q, k):
        if reason := _cuda_dtype_reason(q, _HALF):
            return reason
        if not torch.backends.cudnn.is_available() or torch.backends.cudnn.version() < 90000:
            return "needs cuDNN >= 9"
        return _ampere_head_dim_reason(q, 128)

    def _forward(self, q, k, v, causal, scale):
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale)
        return res[0], res[1].view(res[1].shape[:3])  # lse is [B, H, S, 1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        if q.shape[2] == k.shape[2] == 1:  # cuDNN rejects it (a one-token document); out = v, so only v has a grad
            return torch.zeros_like(q), torch.zeros_like(k), sum_kv_groups(dout, k.shape[1]).to(v.dtype)
        aux = self._aux.get(q)
        cum_q, cum_k, seed, offset = aux[2], aux[3], aux[6], aux[7]
        dout, out = strided_like_q(dout, q), strided_like_q(out, q)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, cum_q, cum_k,
            q.shape[2], k.shape[2], 0.0, causal, scale=scale)

    def _native_gqa(self, cu_seqlens) -> bool:
        return self.native_gqa and cu_seqlens is None

    # A document with at least this much work (tokens^2 x heads x head_dim) gets a cuDNN call of its own (about
    # 535 TFLOP/s on an H200, against about 300 for the varlen flash op); runs of smaller ones share one varlen
    # flash call, since a call of its own costs about 0.3 ms fwd+bwd whatever its size. On an H200 with 32 heads
    # of 128 the crossover lies between documents of 1K and 2K tokens (benchmarks/bench_varlen.py).
    OWN_CALL_WORK = 2048 * 2048 * 32 * 128

    def _document_runs(self, q: Tensor, k: Tensor, cu_seqlens) -> list[tuple[int, int, tuple | None]]:
        """(first row, end row, cumulative lengths inside, or None for one cuDNN call) covering the rows."""
        flash = get_kernel("flash")
        varlen = flash.supports(q, k) is None and flash.has_varlen(q)
        per_token = q.shape[1] * q.shape[3]
        runs: list[list] = []
        for a, b in zip(cu_seqlens, cu_seqlens[1:]):
            if not varlen or (b - a) ** 2 * per_token >= self.OWN_CALL_WORK:
                runs.append([a, b, None])
            elif runs and runs[-1][2] is not None:
                runs[-1][1] = b
                runs[-1][2].append(b - runs[-1][0])
            else:
                runs.append([a, b, [0, b - a]])
        return [(a, b, None if cu is None or len(cu) == 2 else tuple(cu)) for a, b, cu in runs]

    def _forward_varlen(self, q, k, v, cu_seqlens, causal, scale):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=accumulation_dtype(q.dtype), device=q.device)
        for a, b, cu in self._document_runs(q, k, cu_seqlens):
            rows = slice(a, b)
            args = (q[:, :, rows], k[:, :, rows], v[:, :, rows])
            out[:, :, rows], lse[:, :, rows] = (self._forward(*args, causal, scale) if cu is None else
                                                get_kernel("flash")._forward_varlen(*args, cu, causal, scale))
        return out, lse

    def _backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for a, b, cu in self._document_runs(q, k, cu_seqlens):
            rows = slice(a, b)
            args = (dout[:, :, rows], q[:, :, rows], k[:, :, rows], v[:, :, rows], out[:, :, rows], lse[:, :, rows])
            dq[:, :, rows], dk[:, :, rows], dv[:, :, rows] = (
                self._backward(*args, causal, scale) if cu is None else
                get_kernel("flash")._backward_varlen(*args, cu, causal, scale))
        return dq, dk, dv


class FlashKernel(AttentionKernel):
    """PyTorch's built-in FlashAttention-2 kernel (``aten._scaled_dot_product_flash_attention``)."""

    name = "flash"

    def __init__(self):
        self._aux = _CudaAuxCache(lambda t: torch.ops.aten._scaled_dot_product_flash_attention(t, t, t, 0.0, False))
        self._varlen_aux = _CudaAuxCache(lambda t: _flash_varlen_forward(t, t, t, (0, t.shape[2]), False, None))

    def supports(self, q, k):
        return _cuda_dtype_reason(q, _HALF) or _ampere_head_dim_reason(q, 256)

    def has_varlen(self, q: Tensor) -> bool:
        """Whether this torch's varlen flash op gives the per-token lse [H, T] that the ring merge needs."""
        lse = self._varlen_aux.get(q)[1]
        return lse.dim() == 2 and lse.shape[1] == 16

    def _forward_varlen(self, q, k, v, cu_seqlens, causal, scale):
        if not self.has_varlen(q):
            return super()._forward_varlen(q, k, v, cu_seqlens, causal, scale)
        res = _flash_varlen_forward(q, k, v, cu_seqlens, causal, scale)
        b, h = q.shape[:2]
        return _untokens(res[0], b), res[1].view(h, b, -1).transpose(0, 1)

    def _backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, causal, scale):
        if not self.has_varlen(q):
            return super()._backward_varlen(dout, q, k, v, out, lse, cu_seqlens, causal, scale)
        b, h, s, _ = q.shape
        aux = self._varlen_aux.get(q)
        cu = _batch_cu_seqlens(tuple(cu_seqlens), b, s, q.device)
        longest = max(y - x for x, y in zip(cu_seqlens, cu_seqlens[1:]))
        grads = torch.ops.aten._flash_attention_backward(
            _tokens(dout).contiguous(), _tokens(q), _tokens(k), _tokens(v), _tokens(out).contiguous(),
            lse.transpose(0, 1).reshape(h, b * s).contiguous(), cu, cu, longest, longest, 0.0, causal, aux[2], aux[3],
            scale=scale)
        return tuple(_untokens(g, b) for g in grads)

    def _forward(self, q, k, v, causal, scale):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        aux = self._aux.get(q)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), aux[2], aux[3],
            q.shape[2], k.shape[2], 0.0, causal, aux[6], aux[7], scale=scale)


class EfficientKernel(AttentionKernel):
    """PyTorch's memory-efficient attention (``aten._scaled_dot_product_efficient_attention``), also fp32."""

    name = "efficient"

    def __init__(self):
        self._aux = _CudaAuxCache(lambda t: torch.ops.aten._scaled_dot_product_efficient_attention(
            t, t, t, None, True, 0.0, False))

    def supports(self, q, k):
        return _cuda_dtype_reason(q, (*_HALF, torch.float32))

    def _forward(self, q, k, v, causal, scale):
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, causal, scale=scale)
        return out, lse[..., : q.shape[2]]  # the kernel pads lse rows to a multiple of 32

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        aux = self._aux.get(q)
        pad = -q.shape[2] % 32  # give the kernel back the row padding it produced in forward
        lse = torch.nn.functional.pad(lse, (0, pad)).contiguous()
        # The kernel reads out/dout as [B, S, H, D] memory (the layout its forward writes); a
        # BHSD-contiguous out silently gives wrong dq/dk (seen on H200, torch 2.11).
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            _bshd(dout), q, k, v, None, _bshd(out), lse, aux[2], aux[3],
            0.0, [True, True, True, False], causal, scale=scale)
        return dq, dk, dv


class FlashAttnPackageKernel(AttentionKernel):
    """The optional ``flash_attn`` package (Dao-AILab); used only when it imports."""

    name = "flash_attn"
    native_gqa = True

    def __init__(self):
        import flash_attn.flash_attn_interface as fai  # noqa: F401  (raises ImportError when absent)
        self._fai = fai

    def supports(self, q, k):
        if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return "needs CUDA bf16/fp16"
        return None

    def _forward(self, q, k, v, causal, scale):
        res = self._fai._flash_attn_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, softmax_scale=scale,
            causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
            return_softmax=False)
        return res[0].transpose(1, 2), res[1]

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        tq, tk, tv = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        dq, dk, dv = torch.empty_like(tq), torch.empty_like(tk), torch.empty_like(tv)
        self._fai._flash_attn_backward(
            dout.transpose(1, 2), tq, tk, tv, out.transpose(1, 2), lse.contiguous(), dq, dk, dv,
            dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


KERNELS: dict[str, type[AttentionKernel]] = {
    k.name: k for k in (ReferenceKernel, CPUFlashKernel, CudnnKernel, FlashKernel, EfficientKernel,
                        FlashAttnPackageKernel)
}
_instances: dict[str, AttentionKernel] = {}
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_AUTO_ORDER = ("cudnn", "flash", "efficient")


def get_kernel(name: str) -> AttentionKernel:
    """The (cached) kernel instance called ``name``; ImportError for flash_attn when it is absent."""
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {sorted(KERNELS)} or 'auto'")
    if name not in _instances:
        _instances[name] = KERNELS[name]()
    return _instances[name]


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Shape/dtype checks shared by every backend; raises ValueError saying what to change."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type == "cpu" and q.dtype not in CPU_DTYPES:
        raise ValueError(f"{q.dtype} is not supported on CPU: cast the model/inputs to float32 "
                         "(bf16/fp16 are for CUDA)")


def select_kernel(q: Tensor, k: Tensor, kernel: str | AttentionKernel | None = None) -> AttentionKernel:
    """Resolve ``kernel`` (instance, name, 'auto' or None -> $EASY_CONTEXT_KERNEL or auto) for q/k."""
    if isinstance(kernel, AttentionKernel):
        return kernel
    name = kernel or os.environ.get(ENV_VAR, "auto")
    if name != "auto":
        k_obj = get_kernel(name)
        reason = k_obj.supports(q, k)
        if reason:
            raise ValueError(f"attention kernel {name!r} cannot run {q.dtype} head_dim={q.shape[-1]} "
                             f"on {q.device.type}: {reason}")
        return k_obj
    if q.device.type == "cpu":
        return get_kernel("cpu_flash" if q.dtype in CPU_DTYPES else "reference")
    if q.device.type == "cuda":
        for name in CUDA_AUTO_ORDER:
            k_obj = get_kernel(name)
            if k_obj.supports(q, k) is None:
                return k_obj
    return get_kernel("reference")


def available_kernels(q: Tensor, k: Tensor) -> list[str]:
    """Names of the kernels that can run these inputs here (flash_attn only when installed)."""
    names = []
    for name in KERNELS:
        try:
            if get_kernel(name).supports(q, k) is None:
                names.append(name)
        except ImportError:
            pass
    return names
