"""cepe/cross_attention.py: the block equals plain float64 attention (its own RMSNorm, queries from the decoder,
keys and values projected from the encoder's width, no RoPE, not causal, padded memory left out), forward and
backward; its initializations are what they say."""

from __future__ import annotations

import copy

import pytest
import torch

from easy_context.cepe.cross_attention import CrossAttention, Memory, init_cross_attention
from tests.cepe.tiny import tiny_cepe
from tests.helpers.reference import rel_err


def reference(block: CrossAttention, hidden, states, mask):
    """The block's output computed the plain way: its norm (transformers' RMSNorm), projections, softmax with -inf
    on padding, o_proj."""
    x = block.norm(hidden)
    b, s, _ = hidden.shape
    heads, kv, d = block.heads, block.kv_heads, block.head_dim
    q = (x @ block.q_proj.weight.t()).view(b, s, heads, d).transpose(1, 2)
    k = (states @ block.k_proj.weight.t()).view(b, -1, kv, d).transpose(1, 2).repeat_interleave(heads // kv, 1)
    v = (states @ block.v_proj.weight.t()).view(b, -1, kv, d).transpose(1, 2).repeat_interleave(heads // kv, 1)
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key at all: no output
    out = (weights @ v).transpose(1, 2).reshape(b, s, heads * d)
    return out @ block.o_proj.weight.t()


@pytest.mark.parametrize("kernel", ["reference", "cpu_flash"])
def test_cross_attention_equals_plain_attention_forward_and_backward(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    block = tiny_cepe(seed=seed % 100, dtype=torch.float64).decoder.model.layers[1].cross_attn
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    dtype = torch.float64 if kernel == "reference" else torch.float32
    block = block.to(dtype)
    hidden = torch.randn(3, 5, 64, generator=g, dtype=dtype)
    states = torch.randn(3, 11, 32, generator=g, dtype=dtype)
    mask = torch.rand(3, 11, generator=g) < 0.7
    mask[0, :2] = True
    mask[2] = False  # this row has no memory at all
    got_in = [hidden.clone().requires_grad_(), states.clone().requires_grad_()]
    got = block(got_in[0], Memory(got_in[1], mask, kernel=kernel))
    ref_block = copy.deepcopy(block).double()
    want_in = [hidden.clone().double().requires_grad_(), states.clone().double().requires_grad_()]
    want = reference(ref_block, *want_in, mask)
    tol = 1e-10 if dtype == torch.float64 else 2e-5  # ||got - want|| / ||want||
    assert rel_err(got, want) < tol
    assert got[2].abs().max() == 0
    dout = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, [*got_in, *block.parameters()], dout.to(dtype))
    want_grads = torch.autograd.grad(want, [*want_in, *ref_block.parameters()], dout)
    names = ["hidden", "states", *(n for n, _ in block.named_parameters())]
    for name, a, b in zip(names, got_grads, want_grads):
        assert rel_err(a, b) < tol, name


def test_copy_init_takes_the_layers_self_attention_sliced_and_its_post_attention_norm():
    model = tiny_cepe("qwen2")  # q/k/v biases too
    layer = model.decoder.model.layers[0]
    cross, sa = layer.cross_attn, layer.self_attn
    assert torch.equal(cross.q_proj.weight, sa.q_proj.weight) and torch.equal(cross.o_proj.weight, sa.o_proj.weight)
    assert torch.equal(cross.k_proj.weight, sa.k_proj.weight[:, :32])  # the encoder is 32 wide, the decoder 64
    assert torch.equal(cross.v_proj.weight, sa.v_proj.weight[:, :32]) and torch.equal(cross.k_proj.bias, sa.k_proj.bias)
    assert torch.equal(cross.norm.weight, layer.post_attention_layernorm.weight)
    assert cross.norm.weight.data_ptr() != layer.post_attention_layernorm.weight.data_ptr()  # a copy, not shared


def test_zero_and_normal_init():
    block = tiny_cepe().decoder.model.layers[0].cross_attn
    init_cross_attention(block, None, None, "zero", std=0.5)
    assert block.o_proj.weight.abs().max() == 0 and 0.3 < block.q_proj.weight.std() < 0.7
    init_cross_attention(block, None, None, "normal", std=0.5)
    assert 0.3 < block.o_proj.weight.std() < 0.7 and torch.equal(block.norm.weight, torch.ones(64))
    with pytest.raises(ValueError, match="unknown cross-attention init 'ones'"):
        init_cross_attention(block, None, None, "ones")


def test_memory_shapes_are_checked():
    with pytest.raises(ValueError, match="memory mask \\(2, 3\\) must be \\[batch, tokens\\] = \\(2, 4\\)"):
        Memory(torch.zeros(2, 4, 8), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries must be one of"):
        Memory(torch.zeros(2, 4, 8), queries="some")
