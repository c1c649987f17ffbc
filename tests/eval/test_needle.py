"""Needle eval: the haystack is read in name order and tokenized once, the needle lands after a sentence
end at the asked depth, the answer's positions come from the tokenizer, the scorer says yes to a model that
knows the answer and no otherwise (teacher-forced and generated), logits exist only at the answer
positions, sequence-parallel predictions equal single-process ones, bad input raises, and results resume
but refuse other settings."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.world import haystack
from easy_context import apply_seq_parallel_monkey_patch
from easy_context.eval.needle import (TEMPLATES, NeedleResults, NeedleTask, answer_predictions, depth_sweep, digits_right,
                                 haystack_tokens, read_haystack_dir, score)
from easy_context.eval.lengths import check_lengths
from easy_context.world.default import build_tokenizer, tiny_config
from tests.helpers.memory import LargestAllocation
from tests.helpers.tiny_models import tiny_model

BACKENDS_P2 = ("zigzag_ring", "ring", "ulysses", "dist_flash")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def bigram_model(vocab: int, successor: dict[int, int]):
    """A 1-layer Llama that predicts successor[t] after token t (0 for other tokens): its attention runs
    but writes nothing (o_proj and down_proj are zero), so it 'knows' exactly the answers it is given."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         tie_word_embeddings=False, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    head = torch.zeros(vocab, vocab)
    for t, s in successor.items():
        head[s, t] = 1.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(head)
    return model.eval()


def chain_model(vocab: int, chain: list[int]):
    return bigram_model(vocab, dict(zip(chain[:-1], chain[1:])))


class _Counting:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_haystack_dir_in_name_order_tokenized_once(tmp_path, tok):
    (tmp_path / "b.txt").write_text(" Second part. The end.")
    (tmp_path / "a.txt").write_text("First part.")
    assert read_haystack_dir(str(tmp_path)) == "First part. Second part. The end."
    counting = _Counting(tok)
    ids, what = haystack_tokens(counting, 5000, str(tmp_path))
    once = tok("First part. Second part. The end.", add_special_tokens=False)["input_ids"]
    assert counting.calls == 1 and len(ids) == 5000 and ids[:2 * len(once)] == once * 2
    assert what.startswith(os.path.basename(tmp_path)) and "sha256" in what
    short, _ = haystack_tokens(tok, 300)
    long, what = haystack_tokens(tok, 2000)
    assert short == long[:300] and what.startswith("builtin")  # a longer sweep extends the same haystack


def test_needle_goes_after_the_next_sentence_end(tok):
    hay, _ = haystack_tokens(tok, 1024)
    task = NeedleTask(tok, hay)
    needle = tok(haystack.needle("Singapore", "1234567"), add_special_tokens=False)["input_ids"]
    for depth in depth_sweep(step=10):
        p = task.prompt(512, depth, "1234567")
        assert len(p.ids) == 512 and p.ids[0] == tok.bos_token_id
        at = p.needle_at
        assert p.ids[at:at + len(needle)] == needle
        room = 512 - len(p.ids[:1]) - len(needle) - (len(p.ids) - p.answer_start) - len(
            tok(haystack.question("Singapore"), add_special_tokens=False)["input_ids"])
        target = 1 + int(room * depth / 100)
        if depth == 0:
            assert at == 1
        elif at == 1 + room:  # no sentence end after the target: the exact place (the end here)
            assert not any(tok.decode([t]).strip().endswith(".") for t in p.ids[target:at])
        else:
            assert at > target and tok.decode(p.ids[1:at]).rstrip().endswith(".")
            assert not any(tok.decode([t]).strip().endswith(".") for t in p.ids[target:at - 1])


def test_answer_positions_come_from_the_tokenizer(tok):
    hay, _ = haystack_tokens(tok, 512)
    for name, answer_text in [("default", " 7654321."), ("easycontext", "7654321")]:
        p = NeedleTask(tok, hay, template=name).prompt(400, 50, "7654321")
        assert p.answer_ids == tok(answer_text, add_special_tokens=False)["input_ids"]
        assert tok.decode(p.answer_ids) == answer_text
        question = TEMPLATES[name].question.format(key="Singapore")
        assert tok.decode(p.ids[:p.answer_start]).endswith(question)
    assert tok.decode(p.ids[1:40]).startswith("This is a very long story book: <book>")
    # The default model is trained on question and answer tokenized together: the pieces must agree.
    q, a = haystack.question("Singapore"), haystack.answer("7654321")
    assert tok(q + a, add_special_tokens=False)["input_ids"] == (tok(q, add_special_tokens=False)["input_ids"]
                                                                + tok(a, add_special_tokens=False)["input_ids"])


def _distinct_digit_samples(task: NeedleTask, count: int) -> list[int]:
    return [s for s in range(200) if len(set(task.number(s))) == task.digits][:count]


def test_scoring_says_yes_and_no(tok):
    hay, _ = haystack_tokens(tok, 512)
    task = NeedleTask(tok, hay)
    yes, no = _distinct_digit_samples(task, 2)
    p = task.prompt(300, 50, task.number(yes))
    model = chain_model(len(tok), p.ids[p.answer_start - 1:])  # knows sample `yes`'s answer only
    for scoring in ("forward", "generate"):
        right = score(model, task, 300, 50, yes, scoring)
        wrong = score(model, task, 300, 50, no, scoring)
        assert right["correct"] and not wrong["correct"], (scoring, right, wrong)
        assert task.number(yes) in right["predicted"] and right["number"] == task.number(yes)
    assert right["needle_at"] == p.needle_at
    assert not score(tiny_model("llama", 0, vocab_size=len(tok)), task, 300, 50, yes)["correct"]


def test_scorer_computes_logits_only_at_answer_positions():
    vocab, s = 4096, 512
    model = apply_seq_parallel_monkey_patch("zigzag_ring", tiny_model("llama", 0, vocab_size=vocab))
    ids = torch.randint(vocab, (s,))
    with LargestAllocation() as rec:
        answer_predictions(model, ids, s - 10, 10)
    assert rec.numel < s * vocab // 4, f"{rec.op} allocated {rec.numel} elements"


def _sp_worker(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    s = 203  # padded to a multiple of 2 x world
    ids = torch.randint(128, (s,), generator=g)
    ref_model = tiny_model("llama", seed)
    ref = ref_model(input_ids=ids[None]).logits[0].argmax(-1)
    cases = [(30, 120), (s - 5, 5), (1, 1)]  # across both ranks, at the (padded) end, at the start
    for backend in (None, *BACKENDS_P2):
        model = tiny_model("llama", seed)
        if backend:
            apply_seq_parallel_monkey_patch(backend, model)
        for start, n in cases:
            assert answer_predictions(model, ids, start, n) == ref[start - 1:start - 1 + n].tolist(), (backend, start)
    # A model that knows the answer says yes across the boundary between rank 0's and rank 1's tokens.
    ids = torch.randint(20, 128, (64,), generator=g)
    chain = list(range(2, 12))
    ids[13:23] = torch.tensor(chain)
    model = apply_seq_parallel_monkey_patch("zigzag_ring", chain_model(128, chain))
    assert answer_predictions(model, ids, 14, 9) == chain[1:]
    ids[18] = 99
    assert answer_predictions(model, ids, 14, 9) != ids[14:23].tolist()


def test_sequence_parallel_predictions_equal_single_process(seed):
    run_distributed(_sp_worker, 2, seed)


def test_bad_inputs(tmp_path, tok):
    for depths in ([-1.0], [50.0, 100.5]):
        with pytest.raises(ValueError, match="outside 0-100"):
            depth_sweep(depths)
    with pytest.raises(ValueError, match="depth step"):
        depth_sweep(step=0)
    assert depth_sweep(step=25) == [0, 25, 50, 75, 100] and depth_sweep([50, 0, 50]) == [0, 50]
    with pytest.raises(ValueError, match="does not exist"):
        read_haystack_dir(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        haystack_tokens(tok, 100, str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        haystack_tokens(tok, 100, str(tmp_path / "blank"))
    hay, _ = haystack_tokens(tok, 512)
    with pytest.raises(ValueError, match="too short"):
        NeedleTask(tok, hay).check([30, 256], samples=2)
    with pytest.raises(ValueError, match="template"):
        NeedleTask(tok, hay, template="nope")
    with pytest.raises(ValueError, match="position limit of 512"):
        check_lengths([256, 1024], tiny_config(max_position_embeddings=512))


def test_results_resume_and_refuse_other_settings(tmp_path):
    path = str(tmp_path / "out" / "needle.json")
    settings = dict(model="m", template="default", seed=0, rope_theta=None)
    results = NeedleResults(path, settings)
    assert not results.has(256, 50, 0)
    for sample, ok in ((0, True), (1, False)):
        results.add(dict(length=256, depth=50.0, sample=sample, number="12", predicted="12", correct=ok,
                         needle_at=3))
    again = NeedleResults(path, dict(settings))
    assert again.has(256, 50, 0) and again.has(256, 50.0, 1) and not again.has(512, 50, 0)
    assert again.records == results.records and again.accuracy() == 0.5
    with pytest.raises(ValueError, match="different settings.*seed: 0 there, 1 now"):
        NeedleResults(path, {**settings, "seed": 1})
    assert sorted(os.listdir(tmp_path / "out")) == ["needle.json"]  # no temp file left behind
    again.write_csv(str(tmp_path / "out" / "needle.csv"))
    lines = open(tmp_path / "out" / "needle.csv").read().splitlines()
    assert lines[0] == "length,depth,sample,number,predicted,correct,needle_at" and len(lines) == 3


def test_digits_right_gives_partial_credit_place_by_place():
    assert digits_right("1234567", " 1234567.") == 1.0
    assert digits_right("1234567", " 1234500.") == 5 / 7
    assert digits_right("1234567", " 7654321.") == 1 / 7  # only the middle 4 is in its place
    assert digits_right("1234567", " 12.") == 2 / 7  # a short number: the missing digits are wrong
    assert digits_right("1234567", " no number") == 0.0


def test_depth_steps_that_give_more_depths_than_a_heatmap_can_show_are_refused():
    assert len(depth_sweep(step=0.1)) == 1001
    for step in (1e-4, 1e-12):  # 1e-12: a list of 1e14 depths, never finished
        with pytest.raises(ValueError, match=r"--depth-step .* gives more than 1001 depths: use at least 0\.1"):
            depth_sweep(step=step)


def test_real_text_haystack_and_offsets(tok):
    from easy_context.world import real_text

    ids, what = haystack_tokens(tok, 3000, "pydoc")
    text, described = real_text.corpus("pydoc", "heldout")
    assert what == described and ids == tok(text, add_special_tokens=False)["input_ids"][:3000]
    assert haystack_tokens(tok, 300, "generated") == haystack_tokens(tok, 300)
    task = NeedleTask(tok, ids)
    at0, moved = task.prompt(512, 50, "1234567"), task.prompt(512, 50, "1234567", offset=700)
    assert len(moved.ids) == 512 and moved.ids != at0.ids and moved.answer_ids == at0.answer_ids
    assert moved.ids[1:11] == ids[700:710]  # the haystack part starts 700 tokens in
    fixed = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (
        haystack.needle("Singapore", "1234567"), haystack.question("Singapore"), haystack.answer("1234567")))
    starts = len(ids) - (512 - 1 - fixed) + 1  # the offsets that leave room for the haystack part
    assert task.prompt(512, 50, "1234567", offset=700 + starts).ids == moved.ids  # past the end: wraps around
