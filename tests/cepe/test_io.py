"""cepe/io.py: a saved CEPE model holds its CEPE fields and only the encoder's and cross-attention blocks' weights
(the decoder too when asked); loading it back gives the same model, the same outputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from easy_context.cepe.io import CONFIG_FILE, WEIGHTS_FILE, load_cepe, read_cepe_config, save_cepe
from tests.cepe.tiny import chunks, tiny_cepe
from tests.helpers.tiny_models import tiny_model

IDS = torch.randint(128, (1, 10), generator=torch.Generator().manual_seed(0))


def outputs(model):
    return model(IDS, memory=model.encode(chunks(4, 1, 3)))


@pytest.fixture
def decoder_dir(tmp_path):
    path = str(tmp_path / "decoder")
    tiny_model("llama", 0).save_pretrained(path)
    return path


def test_round_trip_without_the_decoders_weights(tmp_path, decoder_dir):
    model = tiny_cepe(seed=0, init="normal")  # the same decoder as decoder_dir, a random encoder
    out = save_cepe(model, str(tmp_path / "cepe"), decoder_source=decoder_dir)
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]
    saved = load_file(os.path.join(out, WEIGHTS_FILE))
    assert saved and all(k.startswith("encoder.") or ".cross_attn." in k for k in saved)
    cfg, source = read_cepe_config(out)
    assert cfg == model.cepe_config and source == os.path.abspath(decoder_dir)
    assert json.load(open(os.path.join(out, CONFIG_FILE)))["cepe"]["encoder_hidden_size"] == 32
    loaded = load_cepe(out)
    assert torch.equal(outputs(loaded), outputs(model))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(saved)


def test_round_trip_with_the_decoder_stands_alone(tmp_path):
    model = tiny_cepe(seed=1, init="normal")
    out = save_cepe(model, str(tmp_path / "cepe"), decoder_source="not/a/model", save_decoder=True)
    assert os.path.exists(os.path.join(out, "config.json"))  # the decoder's own HF files
    assert read_cepe_config(out)[1] == out
    assert torch.equal(outputs(load_cepe(out)), outputs(model))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, decoder_dir):
    out = save_cepe(tiny_cepe(cross_layers=1), str(tmp_path / "cepe"), decoder_source=decoder_dir)
    meta = json.load(open(os.path.join(out, CONFIG_FILE)))
    meta["cepe"]["cross_layers"] = 2
    json.dump(meta, open(os.path.join(out, CONFIG_FILE), "w"))
    with pytest.raises(ValueError, match="does not fit its config: missing \\['decoder.model.layers.0.cross_attn"):
        load_cepe(out)
    with pytest.raises(ValueError, match="not a saved CEPE model"):
        read_cepe_config(decoder_dir)
