"""Perplexity: the windows of both protocols score what they claim, the NLL equals Hugging Face's loss,
sequence-parallel NLL and perplexity equal single-process ones, documents load from every source, and
bad input (lengths above the position limit, bad strides, no long-enough document) raises."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.helpers.distributed import run_distributed
from easy_context.hf.attention import apply_seq_parallel_monkey_patch
from easy_context.eval.perplexity import (PerplexityResult, check_lengths, check_protocol, collect_documents,
                                     dataset_rows, describe_protocol, evaluate_perplexity, length_sweep,
                                     sequence_nll, text_dir_rows, window_tensors, windows, write_perplexity_csv)
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import tiny_model

BACKENDS_P2 = ("zigzag_ring", "ring", "ulysses", "dist_flash")


class _Tok:
    """The tokenizer surface collect_documents uses: one id per character, BOS 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 100 for c in text]}


def test_length_sweep():
    assert length_sweep([512, 256, 512]) == [256, 512]
    assert length_sweep(None, 100, 400, 100) == [100, 200, 300, 400]
    assert length_sweep(None, 256, 1000) == [256, 512, 1000]  # doubling, the max always included
    for args, match in [((None, 10, 5), "above"), ((None, 10, 20, 0), "step"), ((None,), "lengths"),
                        (([1],), "at least 2")]:
        with pytest.raises(ValueError, match=match):
            length_sweep(*args)


@pytest.mark.parametrize("bos", [True, False])
def test_windows_score_every_token_once(bos):
    n, length, stride = 1000, 256, 100
    first = 0 if bos else 1
    ws = windows(n, length, "sliding", stride, bos=bos)
    scored = [t for w in ws for t in range(w.score_from, w.end)]
    assert scored == list(range(first, n))  # each token once, in order
    for w in ws:
        assert w.end - w.begin <= length - bos
        if w.begin > 0:  # after the first window every scored token keeps >= L - 1 - stride tokens of context
            assert w.score_from - w.begin + bos >= length - 1 - stride
    (t,) = windows(n, length, "truncate", bos=bos)
    assert (t.begin, t.end, t.score_from) == (0, length - bos, first)
    ids, labels = window_tensors(list(range(10, 10 + n)), ws[1], 1 if bos else None)
    assert len(ids) == ws[1].end - ws[1].begin + bos and (ids[0] == 1) == bos
    assert int((labels != -100).sum()) == ws[1].end - ws[1].score_from
    assert labels[-1] == ids[-1]


def test_bad_protocol_arguments_raise():
    with pytest.raises(ValueError, match="stride"):
        check_protocol([256, 512], "sliding", 300)  # longer than the shortest window
    with pytest.raises(ValueError, match="stride"):
        windows(100, 64, "sliding", None)
    with pytest.raises(ValueError, match="protocol"):
        windows(100, 64, "strided", 8)
    with pytest.raises(ValueError, match="too short"):
        windows(100, 256, "truncate")
    check_protocol([256, 512], "truncate", None)


def test_position_limit():
    config = tiny_model("llama", 0).config  # max_position_embeddings 1024
    check_lengths([512, 1024], config)
    with pytest.raises(ValueError, match="position limit of 1024.*--allow-extrapolation"):
        check_lengths([512, 2048], config)
    check_lengths([2048], config, allow_extrapolation=True)
    check_lengths([2048], config, rope_theta=1e6)  # a new RoPE base: the limit is the user's call
    from easy_context.hf.models import apply_rope

    apply_rope(config, rope_scaling="linear:factor=4")
    check_lengths([4096], config)
    with pytest.raises(ValueError, match="4096"):
        check_lengths([8192], config)


def test_nll_equals_hf_loss(seed):
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(128, (77,), generator=g)
    labels = ids.clone()
    labels[:10] = -100
    nll, count = sequence_nll(model, ids, labels)
    ref = model(input_ids=ids[None], labels=labels[None]).loss
    assert count == 77 - 10 and rel_err(torch.tensor(nll / count), ref) < 1e-5


def test_perplexity_aggregation(seed):
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 128, (300,), generator=g).tolist() for _ in range(2)]
    calls = []
    trunc = evaluate_perplexity(model, docs, [64, 128], bos_id=1, progress=calls.append)
    assert sum(calls) == 4
    assert [(r.length, r.documents, r.tokens) for r in trunc] == [(64, 2, 126), (128, 2, 254)]
    per_doc = [sequence_nll(model, *window_tensors(d, windows(300, 128)[0], 1)) for d in docs]
    assert math.isclose(trunc[1].nll, sum(s for s, _ in per_doc), rel_tol=1e-6)
    assert math.isclose(trunc[1].perplexity, math.exp(trunc[1].nll / 254))
    slide = evaluate_perplexity(model, docs, [64, 128], protocol="sliding", stride=32, bos_id=1)
    assert all(r.tokens == 2 * 127 for r in slide)  # every length scores the same tokens
    assert math.isclose(slide[1].nll, trunc[1].nll, rel_tol=1e-6)  # at the largest length: one window each
    assert PerplexityResult(1, 0, 0, 0.0).perplexity != PerplexityResult(1, 0, 0, 0.0).perplexity  # NaN


def _sp_worker(rank, world, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(128, (203,), generator=g)  # not a multiple of 2 x world: padded
    labels = ids.clone()
    labels[:50] = -100
    docs = [torch.randint(2, 128, (260,), generator=g).tolist() for _ in range(2)]
    ref_model = tiny_model("llama", seed)
    ref = sequence_nll(ref_model, ids, labels)
    ref_ppl = evaluate_perplexity(ref_model, docs, [101, 200], protocol="sliding", stride=50, bos_id=1)
    for backend in BACKENDS_P2:
        model = apply_seq_parallel_monkey_patch(backend, tiny_model("llama", seed))
        nll, count = sequence_nll(model, ids, labels)
        assert count == ref[1] and math.isclose(nll, ref[0], rel_tol=1e-5), (backend, nll, ref)
        if backend == "zigzag_ring":
            ppl = evaluate_perplexity(model, docs, [101, 200], protocol="sliding", stride=50, bos_id=1)
            for a, b in zip(ppl, ref_ppl):
                assert a.tokens == b.tokens and math.isclose(a.perplexity, b.perplexity, rel_tol=1e-5)


def test_sequence_parallel_nll_equals_single_process(seed):
    run_distributed(_sp_worker, 2, seed)


def test_documents_from_every_source(tmp_path):
    from datasets import Dataset

    tok = _Tok()
    rows = [{"text": "x" * 50}, {"text": "y" * 10}, {"text": "z" * 60}, {"text": "w" * 70}]
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    docs, skipped = collect_documents(dataset_rows(str(tmp_path / "d.jsonl")), tok, min_tokens=40, samples=2)
    assert [len(d) for d in docs] == [50, 60] and skipped == 1  # the 4th is never read
    Dataset.from_dict({"input_ids": [[1] + list(range(5, 50)), [1, 5, 6]]}).save_to_disk(str(tmp_path / "tok"))
    docs, skipped = collect_documents(dataset_rows(str(tmp_path / "tok")), tok, min_tokens=40)
    assert docs == [list(range(5, 50))] and skipped == 1  # the leading BOS is dropped: each window adds one
    Dataset.from_dict({"body": ["a" * 45]}).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="--feature"):
        collect_documents(dataset_rows(str(tmp_path / "p.parquet")), tok, min_tokens=40)
    docs, _ = collect_documents(dataset_rows(str(tmp_path / "p.parquet")), tok, min_tokens=40, feature="body")
    assert len(docs[0]) == 45
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "b.txt").write_text("b" * 41)
    (tmp_path / "txt" / "a.txt").write_text("a" * 42)
    docs, _ = collect_documents(text_dir_rows(str(tmp_path / "txt")), tok, min_tokens=40)
    assert [len(d) for d in docs] == [42, 41]  # name order
    with pytest.raises(ValueError, match="no document has the 100 tokens"):
        collect_documents(text_dir_rows(str(tmp_path / "txt")), tok, min_tokens=100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        list(text_dir_rows(str(tmp_path / "empty")))


def test_csv_states_the_protocol(tmp_path):
    import pandas as pd

    header = describe_protocol("sliding", 256, bos=True, source="docs")
    assert "protocol=sliding stride=256" in header and "token-weighted" in header
    path = write_perplexity_csv(str(tmp_path / "out" / "ppl.csv"), [
        dict(model="m", protocol="sliding", stride=256, length=512, documents=2, tokens=10, nll=5.0,
             perplexity=math.exp(0.5))], header)
    assert open(path).readline() == f"# {header}\n"
    df = pd.read_csv(path, comment="#")
    assert list(df.columns) == ["model", "protocol", "stride", "length", "documents", "tokens", "nll", "perplexity"]
    assert df.perplexity[0] == pytest.approx(math.exp(0.5))


@pytest.mark.parametrize("args, match", [
    ((None, 0, 512), "--min-length must be at least 2"),
    ((None, -4, 512), "--min-length must be at least 2"),
    ((None, 0, 512, 64), "--min-length must be at least 2"),
    ((None, 256, 0), "--max-length must be at least 2"),
    ((None, 256, 512, -64), "--length-step must be at least 1"),
    ((None, 256, None), "give the lengths"),
    (([256, 0],), "--lengths must be at least 2"),
])
def test_length_sweep_refuses_lengths_that_never_end_or_make_no_sense(args, match):
    import signal

    def hang(*_):  # today's doubling from 0 (or from a negative length) never ends
        raise TimeoutError("length_sweep did not return")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(ValueError, match=match):
            length_sweep(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_results_resume_and_refuse_other_settings(tmp_path):
    from easy_context.eval.perplexity import PerplexityResults

    csv_path = str(tmp_path / "out" / "ppl.csv")
    settings = dict(protocol="truncate", stride=None, source="docs", samples=2, max_length=512)

    def row(model, length, nll):
        return dict(model=model, protocol="truncate", stride="", length=length, documents=2, tokens=100, nll=nll,
                    perplexity=math.exp(nll / 100))

    store = PerplexityResults(csv_path, settings)
    assert not store.has("a", 256)
    store.add(row("a", 512, 60.0), header="protocol=truncate")  # a kill after this result keeps it
    store.add(row("b", 256, 70.0), header="protocol=truncate")
    store.add(row("a", 256, 50.0), header="protocol=truncate")
    again = PerplexityResults(csv_path, dict(settings))
    assert again.has("a", 512) and again.has("b", 256) and not again.has("b", 512)
    assert [(r["model"], r["length"]) for r in again.rows()] == [("a", 256), ("a", 512), ("b", 256)]
    assert again.header == "protocol=truncate"
    with open(csv_path) as f:  # the CSV follows every result, not only the end of the sweep
        assert f.readline() == "# protocol=truncate\n" and len(f.readlines()) == 4
    with pytest.raises(ValueError, match="different settings.*samples: 2 there, 3 now.*another --output"):
        PerplexityResults(csv_path, {**settings, "samples": 3})
    assert sorted(os.listdir(tmp_path / "out")) == ["ppl.csv", "ppl.json"]  # no temp file left behind
    (tmp_path / "old.csv").write_text("# protocol=truncate\nmodel,length\nm,256\n")  # no results file beside it
    with pytest.raises(ValueError, match="old.csv exists but .*old.json.* does not.*another --output"):
        PerplexityResults(str(tmp_path / "old.csv"), settings)


def test_a_resumed_sweep_scores_the_missing_lengths_as_the_full_one(seed):
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, 128, (300,), generator=g).tolist() for _ in range(2)]
    full = evaluate_perplexity(model, docs, [64, 128], protocol="sliding", stride=32, bos_id=1)
    done = []
    part = evaluate_perplexity(model, docs, [64], protocol="sliding", stride=32, bos_id=1, max_length=128,
                               on_result=done.append)
    assert done == part and part[0] == full[0]  # windows cut at the sweep's largest length, not at 64
