"""Matmuls into a wider dtype: the same values as the plain product added or cast, rounded once where the GEMM
widens (CUDA, bf16 x bf16 -> float32); a cast shared by several matmuls gives the gradients of separate casts."""

from __future__ import annotations

import pytest
import torch

from easy_context.attention.precision import (SharedCasts, accumulation_dtype, add_product_, wide_product,
                                             widens_in_gemm)


def _operands(seed, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a, b, acc = torch.randn(24, 40, generator=g), torch.randn(40, 16, generator=g), torch.randn(24, 16, generator=g)
    return a.to(device, dtype), b.to(device, dtype), acc.to(device)


def test_accumulation_dtype_is_float64_for_float64_and_float32_otherwise():
    assert accumulation_dtype(torch.float64) == torch.float64
    assert {accumulation_dtype(d) for d in (torch.float32, torch.bfloat16, torch.float16)} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_product_adds_the_product_in_place_in_the_accumulators_dtype(seed, dtype):
    a, b, acc = _operands(seed, dtype)
    acc = acc.to(accumulation_dtype(dtype))
    want = acc + (a @ b).to(acc.dtype)
    got = add_product_(acc, a, b)
    assert got is acc and acc.dtype == accumulation_dtype(dtype)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)


def test_on_cpu_no_matmul_widens_and_wide_product_is_the_cast_product(seed):
    a, b, _ = _operands(seed, torch.bfloat16)
    assert not widens_in_gemm(a, b, torch.float32)
    torch.testing.assert_close(wide_product(a, b, torch.float32), (a @ b).float(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8, reason="needs sm80+")
def test_on_cuda_bf16_products_leave_the_gemm_in_float32_rounded_once(seed):
    a, b, acc = _operands(seed, torch.bfloat16, "cuda")
    exact = a.double() @ b.double()  # bf16 operands, exact products and sums
    assert widens_in_gemm(a, b, torch.float32)
    wide = wide_product(a, b, torch.float32)
    rounded = (a @ b).float()  # the plain product is rounded to bf16 first
    assert wide.dtype == torch.float32
    assert (wide.double() - exact).abs().max() < 1e-4 < (rounded.double() - exact).abs().max()
    start = acc.clone()
    add_product_(acc, a, b)
    assert (acc.double() - (start.double() + exact)).abs().max() < 1e-4


def _three_projections(x, weights, cast):
    return sum((cast(x) @ w.to(torch.bfloat16)).float().pow(2).sum() for w in weights)


def test_a_shared_cast_gives_the_gradient_of_separate_casts_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 48, generator=g, requires_grad=True)
    weights = [torch.randn(48, 40, generator=g) for _ in range(3)]
    (separate,) = torch.autograd.grad(_three_projections(x, weights, lambda t: t.to(torch.bfloat16)), [x])
    casts, copies = SharedCasts(), []

    def shared_cast(t):
        copies.append(casts.cast(t, torch.bfloat16))
        return copies[-1]

    (shared,) = torch.autograd.grad(_three_projections(x, weights, shared_cast), [x])
    assert torch.equal(shared, separate) and shared.dtype == torch.float32
    assert len({c.data_ptr() for c in copies}) == 1  # one copy, three uses


def test_a_shared_cast_follows_its_source():
    casts = SharedCasts()
    x = torch.randn(4, 8)
    first = casts.cast(x, torch.bfloat16)
    assert casts.cast(x, torch.bfloat16).data_ptr() == first.data_ptr()
    x.add_(1.0)  # a new version of x: cast again
    assert torch.equal(casts.cast(x, torch.bfloat16), x.to(torch.bfloat16))
    assert casts.cast(x, torch.float16).dtype == torch.float16
    assert casts.cast(x, torch.float32) is x
