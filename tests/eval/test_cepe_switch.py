"""eval_ppl.py and eval_needle.py given a CEPE model directory (it holds cepe_config.json): the perplexity sweep
equals eval_cepe.py's on the same documents and resumes as the plain sweep does; the needle cells equal
``eval.cepe.needle_record``'s; flags that do not fit the model's kind are usage errors, and a window or chunk that
does not fit the model is refused before any weights load."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import eval_cepe
import eval_needle
import eval_ppl
from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.io import load_cepe, save_cepe
from easy_context.cepe.model import build_cepe
from easy_context.eval import cepe as cepe_eval
from easy_context.eval.needle import NeedleTask, haystack_tokens
from easy_context.hf.models import load_tokenizer

NUMBERS = ["window", "chunk", "context", "length", "documents", "tokens", "nll", "perplexity"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The built-in tiny model (256 positions) as the frozen decoder of a CEPE model with 16-token chunks (cross-
    attention copied from self-attention, so the context changes the numbers), and 2 documents as .txt files."""
    from transformers import AutoModelForCausalLM

    from easy_context.world.default import build_default_world, save_text_documents

    d = tmp_path_factory.mktemp("cepe_switch")
    world = build_default_world(str(d / "world"), max_position_embeddings=256)
    tokenizer = load_tokenizer(world)
    torch.manual_seed(0)
    model = build_cepe(AutoModelForCausalLM.from_pretrained(world), CEPEConfig(chunk_size=16, encoder_layers=1))
    cepe = save_cepe(model, str(d / "cepe" / "model"), decoder_source=world, tokenizer=tokenizer)
    save_text_documents(str(d / "docs"), tokenizer, 2, 140)
    return dict(dir=d, world=world, cepe=cepe, docs=str(d / "docs"))


def _csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def test_eval_ppl_on_a_cepe_model_equals_eval_cepe_and_resumes(setup, capsys):
    d, sweep = setup["dir"], ["--window", "32", "--contexts", "0", "16", "40", "--score-tokens", "8", "--samples", "2"]
    out = d / "ppl" / "ppl.csv"
    eval_ppl.main(["-m", setup["cepe"], "--text-dir", setup["docs"], *sweep, "--output", str(out)])
    eval_cepe.main(["--model", setup["cepe"], "--text-dir", setup["docs"], *sweep, "--skip-needle",
                    "--output-dir", str(d / "cepe_out")])
    rows, reference = _csv(out), _csv(d / "cepe_out" / "ppl.csv")
    assert [[r[k] for k in NUMBERS] for r in rows] == [[r[k] for k in NUMBERS] for r in reference]
    assert [(r["model"], r["context"], r["length"], r["tokens"]) for r in rows] == [
        (setup["cepe"], c, str(int(c) + 32), "16") for c in ("0", "16", "40")]
    assert len({r["perplexity"] for r in rows}) == 3  # the encoder's context is read
    assert out.read_text().startswith("# protocol=cepe: decoder window 32 tokens") and out.with_suffix(".png").exists()

    store = out.with_suffix(".json")  # context 16 lost: a resumed context must still read the same windows
    data = json.loads(store.read_text())
    data["rows"] = [r for r in data["rows"] if r["context"] != 16]
    store.write_text(json.dumps(data))
    capsys.readouterr()
    eval_ppl.main(["-m", setup["cepe"], "--text-dir", setup["docs"], *sweep, "--output", str(out)])
    assert f"{setup['cepe']}: 1 of 3 contexts to evaluate" in capsys.readouterr().out
    assert _csv(out) == rows  # the resumed context equals the uninterrupted one
    with pytest.raises(ValueError, match="different settings .*window: 32 there, 48 now"):
        eval_ppl.main(["-m", setup["cepe"], "--text-dir", setup["docs"], *sweep, "--window", "48",
                       "--output", str(out)])


def test_eval_needle_on_a_cepe_model_scores_needles_in_the_encoder_context(setup):
    out = setup["dir"] / "needle" / "n.json"
    eval_needle.main(["--model", setup["cepe"], "--window", "64", "--contexts", "48", "96", "--depths", "0", "100",
                      "--samples", "2", "--key", "Oslo", "--output", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert sorted((c["length"], c["depth"], c["sample"]) for c in cells) == [
        (n, d, s) for n in (48, 96) for d in (0.0, 100.0) for s in (0, 1)]
    tokenizer = load_tokenizer(setup["cepe"])
    hay, _ = haystack_tokens(tokenizer, 96 + 64)
    task = NeedleTask(tokenizer, hay, key="Oslo")
    model = load_cepe(setup["cepe"]).eval()
    for cell in cells:
        expected = cepe_eval.needle_record(model, task, context=cell["length"], window=64, depth=cell["depth"],
                                           sample=cell["sample"], chunk_size=16, pad_id=tokenizer.pad_token_id)
        assert cell == expected
    for suffix in (".csv", ".png", "_digits.png"):
        assert (out.parent / f"n{suffix}").exists()


@pytest.mark.parametrize("script, args, message", [
    (eval_ppl, ["--protocol", "sliding", "--stride", "8"],
     "--protocol, --stride do not apply to it (a CEPE model's perplexity is that of the window's last"),
    (eval_ppl, ["--lengths", "64"], "--lengths does not apply to it (a CEPE sweep grows the encoder's context"),
    (eval_ppl, ["--backend", "zigzag_ring"], "--backend does not apply to it (the processes share the encoder's"),
    (eval_needle, ["--scoring", "generate", "--rope-theta", "1e6"],
     "--rope-theta does not apply to it (the decoder keeps its own RoPE"),
    (eval_needle, ["--scoring", "generate"], "--scoring does not apply to it (a CEPE needle is scored teacher-forced"),
    (eval_needle, ["--ulysses-degree", "2", "--min-length", "64", "--max-length", "128"],
     "--min-length, --max-length do not apply"),
])
def test_flags_that_do_not_apply_to_a_cepe_model_are_usage_errors(setup, capsys, script, args, message):
    source = ["--text-dir", setup["docs"]] if script is eval_ppl else []
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", setup["cepe"], *source, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{setup['cepe']} is a CEPE model (cepe_config.json)" in err and message in err, err


@pytest.mark.parametrize("script, args, message", [
    (eval_ppl, ["--window", "64", "--score-tokens", "8"], "--score-tokens, --window: only for a CEPE model"),
    (eval_needle, ["--contexts", "64", "--lengths", "128"], "--contexts: only for a CEPE model"),
])
def test_cepe_flags_for_another_model_are_usage_errors(setup, capsys, script, args, message):
    source = ["--text-dir", setup["docs"]] if script is eval_ppl else []
    with pytest.raises(SystemExit) as e:
        script.parse_args(["--model", setup["world"], *source, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and f"{setup['world']} holds none" in err, err


def test_a_cepe_model_and_another_in_one_ppl_run_are_a_usage_error(setup, capsys):
    with pytest.raises(SystemExit):
        eval_ppl.parse_args(["-m", setup["cepe"], "-m", setup["world"], "--text-dir", setup["docs"]])
    assert "evaluate them in separate runs" in capsys.readouterr().err


@pytest.mark.parametrize("script, args, message", [
    (eval_ppl, ["--window", "512"], "--window 512 is longer than the decoder's position limit 256"),
    (eval_ppl, ["--window", "32", "--score-tokens", "32"], "--score-tokens 32 must be in \\[1, window - 1 = 31\\]"),
    (eval_needle, ["--chunk-size", "1024"], "--chunk-size 1024 is longer than the encoder's position limit 512"),
    (eval_needle, ["--window", "8", "--contexts", "64"], "a window of at least"),
])
def test_a_sweep_that_does_not_fit_the_model_is_refused_before_it_loads(setup, script, args, message):
    out = setup["dir"] / "refused" / "r.json"
    source = ["--text-dir", setup["docs"]] if script is eval_ppl else []
    with pytest.raises(ValueError, match=message):
        script.main(["--model", setup["cepe"], *source, *args, "--output", str(out)])
    assert not out.parent.exists()
