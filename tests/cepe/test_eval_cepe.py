"""eval/cepe.py and eval_cepe.py: perplexity of the decoder's last window as the encoder's context grows (context 0:
the decoder alone, scored on the window's last tokens only), needles placed only in the encoder's context with the
question closing the decoder's window, and the script that writes both sweeps."""

from __future__ import annotations

import csv
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.io import save_cepe
from easy_context.cepe.model import build_cepe
from easy_context.eval import cepe as cepe_eval
from easy_context.eval.needle import NeedleTask, haystack_tokens
from easy_context.hf.models import load_tokenizer
from tests.cepe.tiny import tiny_cepe
from tests.helpers.launch import REPO, env


@pytest.fixture(scope="module")
def tokenizer(world):
    return load_tokenizer(world)


def test_context_sweep_doubles_from_one_chunk():
    assert cepe_eval.context_sweep(256, 4096, 256) == [0, 256, 512, 1024, 2048, 4096]
    assert cepe_eval.context_sweep(64, 1000, 64) == [0, 64, 128, 256, 512, 1000]


def test_perplexity_scores_the_last_window_tokens_and_context_zero_is_the_decoder_alone():
    model = tiny_cepe(init="zero")  # the blocks add nothing: every context length gives the decoder's numbers
    docs = [torch.randint(128, (70,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    rows = cepe_eval.evaluate_context_perplexity(model, docs, window=20, contexts=[0, 8, 50], chunk_size=8,
                                                 score_tokens=6)
    assert [r["context"] for r in rows] == [0, 8, 50] and [r["length"] for r in rows] == [20, 28, 70]
    assert all(r["tokens"] == 2 * 6 for r in rows)
    nll = 0.0
    for doc in docs:
        window = torch.tensor(doc[50:70])
        logp = torch.log_softmax(model.decoder(input_ids=window[None]).logits[0].double(), -1)
        nll -= sum(logp[i, window[i + 1]].item() for i in range(13, 19))  # tokens 14..19 of the window
    for r in rows:
        assert abs(r["nll"] - nll) < 1e-4 * nll
    with pytest.raises(ValueError, match="the largest context \\+ the window need 90"):
        cepe_eval.check_sweep(docs, window=20, contexts=[70], score_tokens=6)


def test_a_resumed_context_reads_the_windows_of_the_whole_sweep_and_each_row_is_reported_when_done():
    model = tiny_cepe()
    docs = [torch.randint(128, (80,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    sweep = dict(window=20, chunk_size=8, score_tokens=6)
    full = cepe_eval.evaluate_context_perplexity(model, docs, contexts=[0, 8, 50], **sweep)
    seen = []
    part = cepe_eval.evaluate_context_perplexity(model, docs, contexts=[8], largest_context=50, on_result=seen.append,
                                                 **sweep)
    assert part == seen == [full[1]] and full[1]["chunk"] == 8
    alone = cepe_eval.evaluate_context_perplexity(model, docs, contexts=[8], **sweep)  # cut at 28 tokens: others
    assert alone[0]["nll"] != full[1]["nll"]


def test_the_needle_lies_in_the_context_and_the_question_closes_the_window(tokenizer):
    task = cepe_eval.needle_task(tokenizer, 96, 300)
    ex = cepe_eval.needle_example(task, 300, 96, 50.0, "4815162")
    assert len(ex["context"]) == 300 and len(ex["window"]) == 96
    assert ex["context"][0] == tokenizer.bos_token_id
    context, window = tokenizer.decode(ex["context"]), tokenizer.decode(ex["window"])
    assert f"The special magic {task.key} number is: 4815162." in context and "4815162" not in window[:-12]
    assert window.rstrip().endswith(f"What is the special magic {task.key} number? Answer: The special magic "
                                    f"{task.key} number is: 4815162.")
    assert tokenizer.decode(ex["window"][ex["answer_start"]:]) == " 4815162."
    assert 120 < ex["needle_at"] < 180  # half-way into the context, moved to a sentence end


def test_a_template_prefix_opens_the_context_after_the_bos(tokenizer):
    hay, _ = haystack_tokens(tokenizer, 300)
    task = NeedleTask(tokenizer, hay, template="easycontext", key="Oslo")
    ex = cepe_eval.needle_example(task, 200, 96, 50.0, "4815162")
    prefix = tokenizer("This is a very long story book: <book>", add_special_tokens=False)["input_ids"]
    assert ex["context"][:1 + len(prefix)] == [tokenizer.bos_token_id, *prefix] and len(ex["context"]) == 200
    assert "The special magic Oslo number is: 4815162." in tokenizer.decode(ex["context"])
    assert tokenizer.decode(ex["window"]).endswith("Answer: The special magic Oslo number is:4815162")
    with pytest.raises(ValueError, match="a needle cell needs a context of at least"):
        cepe_eval.check_needle_sweep(task, [1 + len(prefix), 200], 96, samples=2)


def test_a_needle_record_is_the_teacher_forced_argmax_of_the_answer(tokenizer):
    model = tiny_cepe(init="zero").double()
    model.decoder.resize_token_embeddings(len(tokenizer))
    model.encoder.model.resize_token_embeddings(len(tokenizer))
    task = cepe_eval.needle_task(tokenizer, 64, 100)
    record = cepe_eval.needle_record(model, task, context=100, window=64, depth=0.0, sample=0, chunk_size=8)
    ex = cepe_eval.needle_example(task, 100, 64, 0.0, task.number(0))
    logits = model.decoder(input_ids=torch.tensor([ex["window"]])).logits[0]
    pred = logits[ex["answer_start"] - 1:-1].argmax(-1).tolist()
    assert record["predicted"] == tokenizer.decode(pred) and record["length"] == 100
    assert record["correct"] == (pred == ex["window"][ex["answer_start"]:])


def test_eval_script_writes_both_sweeps(tmp_path, world):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = build_cepe(AutoModelForCausalLM.from_pretrained(world), CEPEConfig(chunk_size=32, encoder_layers=1))
    path = save_cepe(model, str(tmp_path / "cepe"), decoder_source=world, tokenizer=load_tokenizer(world))
    out = str(tmp_path / "results")
    res = subprocess.run([sys.executable, "eval_cepe.py", "--model", path, "--window", "64", "--contexts", "0", "64",
                          "128", "--samples", "2", "--depth-step", "50", "--needle-samples", "1", "--output-dir", out],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(line for line in open(os.path.join(out, "ppl.csv")) if not line.startswith("#")))
    assert [int(r["context"]) for r in rows] == [0, 64, 128] and all(int(r["tokens"]) == 64 for r in rows)
    cells = json.load(open(os.path.join(out, "needle.json")))["cells"]
    assert sorted((c["length"], c["depth"]) for c in cells) == [(64, d) for d in (0.0, 50.0, 100.0)] + [
        (128, d) for d in (0.0, 50.0, 100.0)]
    assert {"ppl.png", "needle.png", "needle_digits.png", "needle.csv"} <= set(os.listdir(out))


@pytest.mark.parametrize("script", ["train_cepe.py", "eval_cepe.py"])
def test_help_shows_defaults_and_names_no_other_source_file(script, capsys):
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit):
        if script == "train_cepe.py":
            module.parse_cepe_config(["--help"], description=module.__doc__)
        else:
            module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert set(re.findall(r"[\w./-]+\.py\b", text)) - {"__main__.py"} == {script}  # in pytest, prog is __main__.py
    assert "(default: None)" not in text and "(default: 256)" in text
