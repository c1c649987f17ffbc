"""hf/attention.py: every backend inside real Hugging Face decoders. The sequence-parallel loss and every parameter
gradient equal the single-process full-sequence ones; no [S, S] mask is ever built; zigzag position ids are not
read as packed documents; unsupported features raise; a model whose attention cannot be set is refused; EasyContext's
entry point is the same function under its old name."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import run_distributed
from easy_context.attention.registry import BACKENDS, Backend
from easy_context.parallel.groups import init_groups, sp_process_group
from easy_context.hf.attention import (apply_seq_parallel_monkey_patch, implementation_name, register_all,
                                       register_attention, set_attention_implementation,
                                       use_sequence_parallel_attention)
from easy_context.hf.causal_lm import causal_lm_loss
from easy_context.hf.s2attn import apply_s2attn
from easy_context.hf.self_check import self_check
from easy_context.parallel.inputs import prepare_seq_parallel_inputs
from easy_context.attention.layouts import position_ids
from tests.helpers.memory import LargestAllocation
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import FAMILIES, batch, tiny_model

TOL = 1e-5  # float32, relative (||x - ref|| / ||ref||)
SEQ = 32


def _backends(world: int) -> list[tuple[str, object]]:
    """(name, SP group) of every registered backend; USP gets its own group (collective: same order on all ranks)."""
    out = []
    for name in BACKENDS:
        if name == "usp":
            from easy_context.attention.usp import new_usp_group
            out.append((name, new_usp_group(ulysses_degree=2, ring_degree=world // 2)))
        else:
            out.append((name, None))
    return out


def _reference(family: str, seed: int, ids, labels, **overrides):
    """Loss and parameter gradients of the unpatched model on the full sequence (HF's own loss)."""
    model = tiny_model(family, seed, **overrides)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _sp_loss(backend: str, group, family: str, seed: int, ids, labels, checkpointing: bool = False,
             overrides: dict | None = None, **loss_kwargs):
    model = tiny_model(family, seed, **(overrides or {}))
    if checkpointing:  # EasyContext always trained this way: attention reruns (with its ring) in backward
        model.gradient_checkpointing_enable()
        model.train()
    use_sequence_parallel_attention(backend, model, group)
    inp = prepare_seq_parallel_inputs(backend, ids, labels, group=group)
    out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, **loss_kwargs)
    out.loss.backward()
    return model, out


def _check_exact(world: int, seed: int, backends) -> None:
    ids, labels = batch(seed, 2, SEQ)
    for family in FAMILIES:
        ref_loss, ref_grads = _reference(family, seed, ids, labels)
        for backend, group in backends:
            model, out = _sp_loss(backend, group, family, seed, ids, labels, checkpointing=family == "qwen3",
                                  grad_reduction="sum")
            what = f"{family}/{backend} on {world} ranks"
            assert rel_err(out.value, ref_loss) < TOL, f"{what}: loss {out.value} != {ref_loss}"
            for n, p in model.named_parameters():
                dist.all_reduce(p.grad, group=sp_process_group(group))  # "sum" convention
                err = rel_err(p.grad, ref_grads[n])
                assert err < TOL, f"{what}: gradient of {n} off by {err:.1e}"
            if family == "llama":
                errs = self_check(model)
                assert max(errs.values()) < 1e-4, errs


def _check_no_square_tensor(world: int, seed: int, backends) -> None:
    seq = 512
    local = seq // world
    ids = torch.randint(128, (1, seq), generator=torch.Generator().manual_seed(seed))
    for backend, group in backends:
        model = tiny_model("llama", seed)
        use_sequence_parallel_attention(backend, model, group)
        inp = prepare_seq_parallel_inputs(backend, ids, ids, group=group)
        with LargestAllocation() as rec:
            causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, chunk_size=64).loss.backward()
        assert rec.numel < local * local, f"{backend}: {rec.op} allocated {rec.numel} >= {local}^2 elements"


def _check_dp_x_sp(world: int, seed: int) -> None:
    # 2 DP x 2 SP; gradients averaged over the whole world as DDP/DeepSpeed do (grad_reduction="mean").
    groups = init_groups(2)
    refs = [_reference("llama", seed, *batch(seed + d, 2, SEQ)) for d in range(groups.dp_size)]
    ids, labels = batch(seed + groups.dp_rank, 2, SEQ)
    model, out = _sp_loss("zigzag_ring", groups.sp_group, "llama", seed, ids, labels)
    assert rel_err(out.value, refs[groups.dp_rank][0]) < TOL  # each SP group: its own batch's exact loss
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
        expected = sum(grads[n] for _, grads in refs) / len(refs)
        assert rel_err(p.grad, expected) < TOL, n


def _worker(rank, world, seed):
    backends = _backends(world)
    _check_exact(world, seed, backends)
    if world == 2:
        _check_no_square_tensor(world, seed, backends)
    else:
        _check_dp_x_sp(world, seed)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_model_equals_single_process(world, seed):
    run_distributed(_worker, world, seed)


def test_zigzag_position_ids_are_not_read_as_packed():
    from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    local = 256
    pos = position_ids(2 * local, "zigzag", 0, 2)  # rank 0 of 2: [0..127, 384..511]
    # transformers reads the jump as a document boundary: its masks would cut attention there.
    assert find_packed_sequence_indices(pos) is not None and _is_packed_sequence(pos, 1)
    model = tiny_model("llama", 0)
    ids = torch.zeros(1, local, dtype=torch.long)
    with LargestAllocation() as sdpa:  # control: sdpa builds a [local, local] packed-document mask
        model(input_ids=ids, position_ids=pos)
    assert sdpa.numel >= local * local
    apply_seq_parallel_monkey_patch("zigzag_ring", model)
    embeds = torch.zeros(1, local, 64)
    assert create_causal_mask(model.config, embeds, None, None, position_ids=pos) is None
    mask = torch.ones(1, local, dtype=torch.long)  # an all-ones padding mask is no mask
    assert create_causal_mask(model.config, embeds, mask, None, position_ids=pos) is None


def _call_attention(**kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[register_attention("ring")]
    q = torch.randn(1, 4, 8, 16)
    module = torch.nn.Module()
    args = dict(module=module, query=q, key=q[:, :2], value=q[:, :2], attention_mask=None)
    return fn(**{**args, **kwargs})


def test_attention_function_contract():
    q = torch.randn(1, 4, 8, 16)
    out, weights = _call_attention(query=q, key=q[:, :2], value=q[:, :2], scaling=0.3)
    assert out.shape == (1, 8, 4, 16) and weights is None  # [B, S, H, D], compact GQA k/v accepted
    ref = torch.nn.functional.scaled_dot_product_attention(q, q[:, :2], q[:, :2], is_causal=True, scale=0.3,
                                                           enable_gqa=True)
    assert rel_err(out.transpose(1, 2), ref) < 1e-5
    for kwargs, match in [({"softcap": 30.0}, "softcap"), ({"s_aux": torch.zeros(4)}, "s_aux"),
                          ({"dropout": 0.1}, "dropout"), ({"sliding_window": 4}, "sliding window"),
                          ({"cu_seq_lens_q": torch.tensor([0, 8])}, "varlen"),
                          ({"key": q[:, :2, :4], "value": q[:, :2, :4]}, "use_cache=False"),
                          ({"attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}, "attention mask")]:
        with pytest.raises(ValueError, match=match):
            _call_attention(**kwargs)
    _call_attention(softcap=None, sliding_window=8)  # None softcap and a window >= the sequence are fine


def test_models_reject_what_the_backends_cannot_honour():
    ids = torch.randint(128, (2, SEQ))
    model = apply_seq_parallel_monkey_patch("zigzag_ring", tiny_model("llama", 0))
    padding = torch.ones(2, SEQ, dtype=torch.long)
    padding[0, -3:] = 0
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=padding)
    model = apply_seq_parallel_monkey_patch("ring", tiny_model("llama", 0, attention_dropout=0.1))
    model.train()
    with pytest.raises(ValueError, match="attention_dropout"):
        model(input_ids=ids)
    model = apply_seq_parallel_monkey_patch("ring", tiny_model("mistral", 0, sliding_window=8))
    with pytest.raises(ValueError, match="sliding"):
        model(input_ids=ids)
    model = apply_seq_parallel_monkey_patch("ring", tiny_model("mistral", 0, sliding_window=SEQ))
    model(input_ids=ids)  # a window covering the whole sequence is full attention


def test_entry_point_names_and_registry():
    model = tiny_model("llama", 0)
    assert apply_seq_parallel_monkey_patch("data_parallel", model) is model
    assert model.config._attn_implementation == "sdpa"
    apply_seq_parallel_monkey_patch("zigzag_ring_attn", model)  # EasyContext's name
    assert model.config._attn_implementation == "easy_context_zigzag_ring"
    with pytest.raises(ValueError, match="unknown attention backend"):
        apply_seq_parallel_monkey_patch("ring_attn_v2", model)
    assert register_all() == [implementation_name(n) for n in BACKENDS]
    # transformers treats any implementation name containing "flash" as a flash-attention kernel request
    assert "flash" not in implementation_name("dist_flash")
    apply_seq_parallel_monkey_patch(Backend("my_flash", BACKENDS["ring"].attention, "contiguous"), model)
    assert model.config._attn_implementation == "easy_context_my_fa"


def test_autocast_hands_the_backend_one_dtype_as_sdpa_would():
    """float32 weights under bf16 autocast (DDP training on GPU): HF's RoPE leaves q/k float32 while v is
    bf16; the backend must get all three in the autocast dtype (SDPA casts them the same way)."""
    seen = []

    def record(q, k, v, *, causal=True, scale=None, group=None, kernel=None, return_lse=False, check=True):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    ids, _ = batch(0, 2, SEQ)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny_model("llama", 0)(input_ids=ids).logits.float()
        model = apply_seq_parallel_monkey_patch(Backend("record", record, "zigzag"), tiny_model("llama", 0))
        out = model(input_ids=ids, position_ids=torch.arange(SEQ)[None]).logits.float()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)
    assert rel_err(out, ref) < 1e-2
    model(input_ids=ids, position_ids=torch.arange(SEQ)[None])  # outside autocast: float32, untouched
    assert seen[-1] == (torch.float32,) * 3


def test_easy_context_entry_point_is_the_same_function():
    import easy_context

    assert apply_seq_parallel_monkey_patch is use_sequence_parallel_attention
    assert easy_context.apply_seq_parallel_monkey_patch is easy_context.use_sequence_parallel_attention
    model = tiny_model("llama", 0)
    assert apply_seq_parallel_monkey_patch("zigzag_ring_attn", model) is model
    assert model.config._attn_implementation == "easy_context_zigzag_ring"


def test_a_model_that_does_not_dispatch_through_the_attention_interface_is_refused():
    import transformers

    class OwnAttentionLlama(transformers.LlamaForCausalLM):
        # what transformers concludes for a model whose attention layers call their own code
        _can_set_attn_implementation_cached_value = False

    model = OwnAttentionLlama(tiny_model("llama", 0).config)
    name = register_attention("ring")
    with pytest.raises(ValueError, match="does not dispatch attention through transformers. AttentionInterface"):
        set_attention_implementation(model, name, "ring")
    with pytest.raises(ValueError, match="'zigzag_ring' cannot be put into it"):
        use_sequence_parallel_attention("zigzag_ring", model)
    with pytest.raises(ValueError, match="S²-Attn cannot be put into it"):
        apply_s2attn(model)
    assert model.config._attn_implementation == "sdpa"
