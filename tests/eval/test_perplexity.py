"""Perplexity: the windows of both protocols score what they claim, the NLL equals Hugging Face's loss,
sequence-parallel NLL and perplexity equal single-process ones, bad strides raise, the CSV states the protocol,
and the results store resumes a sweep and refuses other settings."""

from __future__ import annotations

import math
import os

import pytest
import torch

from easy_context import apply_seq_parallel_monkey_patch
from easy_context.eval.perplexity import (PerplexityResult, PerplexityResults, check_protocol, describe_protocol,
                                          evaluate_perplexity, sequence_nll, window_tensors, windows,
                                          write_perplexity_csv)
from tests.helpers.distributed import run_distributed
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import tiny_model

BACKENDS_P2 = ("zigzag_ring", "ring", "ulysses", "dist_flash")


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


def test_results_resume_and_refuse_other_settings(tmp_path):
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
