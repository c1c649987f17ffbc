"""Greedy decoding over teacher-forced passes: its tokens are what transformers' own greedy generate makes, a model
that continues the draft costs one pass and a wrong one at most a pass per token, and sequence-parallel decoding
on 2 processes gives the single-process tokens."""

from __future__ import annotations

import pytest
import torch

from easy_context import apply_seq_parallel_monkey_patch
from easy_context.eval.decode import cached_greedy_tokens, greedy_tokens
from easy_context.eval.needle import answer_predictions
from tests.eval.test_needle import chain_model
from tests.helpers.distributed import run_distributed
from tests.helpers.tiny_models import tiny_model


def _generate(model, prompt: list[int], n: int) -> list[int]:
    # no end-of-sequence token: generate would stop at it, or (with min_new_tokens) never emit it
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_equal_generate_and_count_passes(seed):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model("llama", seed)
    prompt = torch.randint(128, (40,), generator=g).tolist()
    reference = _generate(model, prompt, 8)
    wrong_draft = [(t + 1) % 128 for t in reference]
    tokens, passes = greedy_tokens(model, prompt, wrong_draft)
    assert tokens == reference and passes == 8  # every draft token wrong: one pass per token
    tokens, passes = greedy_tokens(model, prompt, reference)
    assert tokens == reference and passes == 1  # the draft is what the model says: one pass
    half = reference[:4] + wrong_draft[4:]
    assert greedy_tokens(model, prompt, half) == (reference, 4)  # 4 right + the 5th in one pass, then 3 more
    forced, passes = greedy_tokens(model, prompt, wrong_draft, exact=False)
    assert passes == 1 and forced == answer_predictions(model, prompt + wrong_draft, len(prompt), 8)


def _sp_worker(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(128, (61,), generator=g).tolist()
    draft = torch.randint(128, (7,), generator=g).tolist()
    expected = greedy_tokens(tiny_model("llama", seed), prompt, draft)
    for backend in ("zigzag_ring", "ulysses"):
        model = apply_seq_parallel_monkey_patch(backend, tiny_model("llama", seed))
        assert greedy_tokens(model, prompt, draft) == expected, backend
    chain = list(range(2, 12))  # a model that knows a continuation across both ranks' tokens: one pass
    model = apply_seq_parallel_monkey_patch("zigzag_ring", chain_model(128, chain))
    assert greedy_tokens(model, [50, 60] + chain[:3], chain[3:]) == (chain[3:], 1)


def test_sequence_parallel_decoding_equals_single_process(seed):
    run_distributed(_sp_worker, 2, seed)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_cached_greedy_tokens_equal_the_pass_per_token_decoder_in_one_pass(seed, rope):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model("llama", seed) if rope is None else tiny_model("llama", seed, rope_scaling=rope)
    prompt = torch.randint(128, (45,), generator=g).tolist()
    reference = _generate(model, prompt, 9)
    wrong_draft = [(t + 1) % 128 for t in reference]
    assert greedy_tokens(model, prompt, wrong_draft) == (reference, 9)
    assert cached_greedy_tokens(model, prompt, 9) == (reference, 1)  # one prefill pass, then one token per step


def test_cached_greedy_decoding_refuses_a_sequence_parallel_model(seed):
    model = apply_seq_parallel_monkey_patch("zigzag_ring", tiny_model("llama", seed))
    with pytest.raises(ValueError, match="one process"):
        cached_greedy_tokens(model, [1, 2, 3], 2)
