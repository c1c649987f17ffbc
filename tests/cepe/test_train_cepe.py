"""train_cepe.py end to end on CPU (accelerate launch, the tiny built-in model): it trains the encoder and the
cross-attention against a frozen decoder (distillation on), saves a CEPE model that loads, leaves the decoder's
weights bit-identical, resumes from a checkpoint to the same losses, and refuses a decoder it cannot wrap before
any weights load."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from easy_context.cepe.io import load_cepe
from tests.helpers.launch import accelerate, launch, log

ARGS = ["--stage", "main", "--window", "64", "--chunk-size", "32", "--context-chunks", "6", "--encoder-layers", "1",
        "--dataset", "tiny", "--lr", "1e-3", "--schedule", "constant", "--warmup-steps", "0", "--kl-coef", "0.5",
        "--kl-topk", "5", "--max-steps", "4", "--checkpoint-every", "2", "--seed", "3"]


def train_cepe(out: str, *args: str, launcher: bool = True) -> subprocess.CompletedProcess:
    """train_cepe.py with ``args`` into ``out``, with accelerate launch's environment or as one plain process."""
    argv = ["--output-dir", out, *args]
    res = (accelerate("train_cepe.py", *argv, config="ddp.yaml") if launcher
           else launch("train_cepe.py", *argv, timeout=600))
    assert res.returncode == 0, f"{' '.join(res.args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def decoder(world):
    """The built-in tiny model (random weights; 256 positions: the teacher reads context + window)."""
    return world


@pytest.fixture(scope="module")
def trained(tmp_path_factory, decoder):
    """(output directory, console output) of a short main-stage run."""
    out = str(tmp_path_factory.mktemp("cepe") / "run")
    return out, train_cepe(out, "--model", decoder, "--save-decoder", *ARGS).stdout


@pytest.fixture(scope="module")
def run(trained):
    return trained[0]


def test_training_saves_a_cepe_model_and_leaves_the_decoder_bit_identical(run, decoder):
    rows = log(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[0]["tokens"] == 6 * 32 + 64
    model = load_cepe(os.path.join(run, "model"))
    assert model.cepe_config.chunk_size == 32 and model.cepe_config.encoder_layers == 1
    saved = load_file(os.path.join(run, "model", "model.safetensors"))  # --save-decoder: the decoder's own file
    original = load_file(os.path.join(decoder, "model.safetensors"))
    assert saved.keys() == original.keys()
    for name, weight in original.items():
        assert torch.equal(saved[name], weight), f"decoder weight {name} changed in training"
    with open(os.path.join(run, "model", "cepe_config.json")) as f:
        assert json.load(f)["decoder"] == "."


def test_it_says_what_the_memory_gains_on_its_last_batch(trained):
    line = next(x for x in trained[1].splitlines() if x.startswith("the encoder's memory on the last batch"))
    with_memory, alone = (float(x) for x in re.findall(r"\d+\.\d{4}", line)[:2])
    assert math.isfinite(with_memory) and math.isfinite(alone) and with_memory != alone


def test_a_resumed_run_continues_with_the_same_losses(run, decoder, tmp_path):
    out = str(tmp_path / "resumed")
    train_cepe(out, "--model", decoder, *ARGS, "--resume-from", os.path.join(run, "checkpoints", "step_2"),
               launcher=False)
    got, want = log(out), log(run)[2:]
    assert [r["step"] for r in got] == [3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor([r["loss"] for r in want]),
                               rtol=1e-5, atol=1e-5)


def test_a_decoder_it_cannot_wrap_is_refused_before_any_weights_load(tmp_path):
    import transformers

    model_dir = tmp_path / "gemma"  # a config and no weights: loading them would fail otherwise
    transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=128).save_pretrained(model_dir)
    res = launch("train_cepe.py", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"))
    assert res.returncode != 0 and "cannot wrap the decoder layers of model type 'gemma2'" in res.stderr, res.stderr
