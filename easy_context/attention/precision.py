"""The dtype attention and loss accumulate in (float64 for float64 inputs, the exact tests; float32 otherwise),
matmuls whose bf16/fp16 products land in that dtype straight from the GEMM where cuBLAS can (CUDA, torch >= 2.8),
and casts of one matmul input shared by the several matmuls that take it."""

from __future__ import annotations

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

Tensor = torch.Tensor
# aten's mm/addmm with ``out_dtype`` (bf16 x bf16 -> float32 in the GEMM's epilogue) exist from torch 2.8, on CUDA
_OUT_DTYPE_MATMUL = "dtype_out" in torch.ops.aten.addmm.overloads() and "dtype" in torch.ops.aten.mm.overloads()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matmul inputs to on ``device_type`` ("cuda", "cpu") now; None where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for any other (bf16, fp16, fp32): the dtype of running sums and lse."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_gemm(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere on: bf16 GEMMs with float32 output


def widens_in_gemm(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    """Whether a @ b (same bf16/fp16 dtype) can come out of the GEMM as float32 ``dtype`` here, rounded once."""
    return (_OUT_DTYPE_MATMUL and a.is_cuda and dtype == torch.float32 and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16) and _cuda_out_dtype_gemm(a.device))


def wide_product(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a [m, k] @ b [k, n] as ``dtype``: straight out of the GEMM where ``widens_in_gemm``, else a @ b (under any
    autocast in force) then cast."""
    if widens_in_gemm(a, b, dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def add_product_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """acc [m, n] += a [m, k] @ b [k, n] in acc's dtype, added inside the GEMM (no [m, n] temporary) where acc, a
    and b share a dtype or ``widens_in_gemm``; else a @ b (under any autocast) is added."""
    if acc.dtype == a.dtype == b.dtype:
        return acc.addmm_(a, b)
    if widens_in_gemm(a, b, acc.dtype):
        return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    return acc.add_(a @ b)


class _SharedCastUse(torch.autograd.Function):
    """One use of a cast shared by several: forward hands out the shared copy ``low``, backward casts this use's
    gradient to ``x``'s dtype, as the backward of a cast of its own would."""

    @staticmethod
    def forward(ctx, x: Tensor, low: Tensor) -> Tensor:
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype), None


class SharedCasts:
    """``x.to(dtype)`` made once per tensor (and version of it) and shared by every matmul that takes x, where
    autocast makes a copy per matmul (the q, k and v projections of one norm output). Each use gets its own
    autograd node that casts its gradient back, so autograd adds the uses' gradients in x's dtype exactly as after
    separate casts. A copy lives as long as x does."""

    def __init__(self):
        self._copies = WeakIdKeyDictionary()

    def cast(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """``x.to(dtype)``, with gradients to x where x takes them."""
        if x.dtype == dtype:
            return x
        hit = self._copies.get(x)
        if hit is None or hit[0] != x._version or hit[1].dtype != dtype:
            hit = (x._version, x.detach().to(dtype))
            self._copies[x] = hit
        return _SharedCastUse.apply(x, hit[1]) if x.requires_grad and torch.is_grad_enabled() else hit[1]
