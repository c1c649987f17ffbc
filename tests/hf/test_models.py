"""models.py: RoPE settings change only when asked and land in the config; named shapes; position limits."""

import pytest
import torch

from easy_context.hf import models


def test_rope_is_kept_unless_asked():
    config = models.shape_config("shape:llama2-7b")
    models.apply_rope(config)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    models.apply_rope(config, rope_theta=5e6, max_position_embeddings=65536)
    assert config.rope_parameters["rope_theta"] == 5e6 and config.max_position_embeddings == 65536


@pytest.mark.parametrize("text", ["yarn:factor=8", '{"rope_type": "yarn", "factor": 8}'])
def test_rope_scaling_keeps_theta_and_records_the_original_length(text):
    config = models.apply_rope(models.shape_config("shape:llama3-8b"), rope_scaling=text)
    assert config.rope_parameters == {"rope_type": "yarn", "factor": 8, "rope_theta": 500000.0,
                                      "original_max_position_embeddings": 8192}
    assert models.position_limit(config) == 8 * 8192


def test_rope_scaling_errors_and_shape_overrides():
    with pytest.raises(ValueError, match="unknown rope scaling type 'warp'"):
        models.parse_rope_scaling("warp:factor=2")
    with pytest.raises(ValueError, match="needs a factor"):
        models.parse_rope_scaling("linear")
    with pytest.raises(ValueError, match="unknown model shape"):
        models.shape_config("shape:gpt5")
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(8\)"):
        models.shape_config("shape:llama3-8b,num_attention_heads=4")  # before any weights exist
    config = models.shape_config("shape:llama3-8b,num_hidden_layers=2")
    assert config.num_hidden_layers == 2 and config.num_key_value_heads == 8 and config.vocab_size == 128256


def test_saved_model_loads_with_new_theta(tmp_path):
    from easy_context.world import default

    path = default.build_default_world(str(tmp_path / "w"))
    model = models.load_model(path, dtype=torch.float32, rope_theta=1e6)
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert models.load_tokenizer(path).eos_token == "</s>"


def test_tiny_tokenizer_by_name_is_the_one_saved_with_the_tiny_world(tmp_path):
    from easy_context.world import default

    saved = models.load_tokenizer(default.build_default_world(str(tmp_path / "w")))
    built = models.load_tokenizer(models.TINY)
    text = "The special magic Singapore number is 4072913."
    assert built(text).input_ids == saved(text).input_ids and built.pad_token == saved.pad_token


@pytest.mark.parametrize("scaling, match", [
    ("linear:factor=0", "factor must be a finite number >= 1"),
    ("yarn:factor=-4", "factor must be a finite number >= 1"),
    ("dynamic:factor=0.5", "factor must be a finite number >= 1"),
    ("yarn:factor=nan", "factor must be a finite number >= 1"),
    ("yarn:factor=inf", "factor must be a finite number >= 1"),
    ("yarn:factor=-inf", "factor must be a finite number >= 1"),
    ('{"rope_type": "yarn", "factor": NaN}', "factor must be a finite number >= 1"),
    ("yarn:factor=8,attention_factor=0", "attention_factor must be a finite number > 0"),
    ("yarn:factor=8,beta_fast=nan", "beta_fast must be a finite number > 0"),
    ("yarn:factor=8,beta_fast=1,beta_slow=32", "beta_fast .* above beta_slow"),
    ("yarn:factor=8,original_max_position_embeddings=0", "original_max_position_embeddings must be a positive"),
    ("llama3:factor=8,low_freq_factor=4,high_freq_factor=1", "high_freq_factor .* above low_freq_factor"),
    ("llama3:factor=8,low_freq_factor=-1,high_freq_factor=4", "low_freq_factor must be a finite number > 0"),
    ('{"rope_type": "longrope", "short_factor": [1, 0], "long_factor": [1, 2]}', "short_factor must be a list"),
    ('{"rope_type": "yarn", "factor": 8, "rope_theta": -1}', "rope_theta must be a finite number > 0"),
])
def test_rope_scaling_that_would_train_a_nan_model_is_refused(scaling, match):
    with pytest.raises(ValueError, match=match):
        models.parse_rope_scaling(scaling)
    with pytest.raises(ValueError, match=match):  # the config path refuses it too, before any weights load
        models.load_config("shape:llama2-7b", rope_scaling=scaling)


@pytest.mark.parametrize("theta", [float("nan"), float("inf"), 0.0, -1e4])
def test_rope_theta_must_be_finite_and_positive(theta):
    with pytest.raises(ValueError, match="--rope-theta must be a finite number > 0.*e.g. --rope-theta 1e6"):
        models.load_config("shape:llama2-7b", rope_theta=theta)


def test_good_rope_settings_still_parse():
    assert models.parse_rope_scaling("yarn:factor=8,beta_fast=32,beta_slow=1,truncate=false") == {
        "rope_type": "yarn", "factor": 8, "beta_fast": 32, "beta_slow": 1, "truncate": False}
    assert models.parse_rope_scaling("linear:factor=1.5")["factor"] == 1.5
    config = models.load_config("shape:llama3-8b", rope_scaling="llama3:factor=8,low_freq_factor=1,high_freq_factor=4")
    assert config.rope_parameters["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("text", ['{"rope_type": "yarn", factor: 8}', "yarn:factor=8x", "yarn:factor=[1,"])
def test_bad_rope_scaling_text_says_what_to_write(text):
    with pytest.raises(ValueError, match=r"--rope-scaling\b.*e\.g\. yarn:factor=8"):
        models.parse_rope_scaling(text)


def test_missing_model_path_says_it_does_not_exist(tmp_path):
    for name in (str(tmp_path / "run" / "model"), "output/stage1/model", "./model"):
        with pytest.raises(ValueError, match=f"--model {name!r} does not exist.*hub name"):
            models.load_config(name)
        with pytest.raises(ValueError, match="does not exist"):
            models.load_tokenizer(name)


@pytest.mark.parametrize("damage", ["empty", "header_cut", "data_cut", "empty_bin", "missing_shard"])
def test_broken_weight_files_are_named_before_any_weights_load(tmp_path, damage):
    import json
    import os

    from easy_context.world import default

    path = default.build_default_world(str(tmp_path / "w"))
    weights = os.path.join(path, "model.safetensors")
    if damage == "empty":
        open(weights, "w").close()
    elif damage in ("header_cut", "data_cut"):
        with open(weights, "r+b") as f:
            f.truncate(200 if damage == "header_cut" else os.path.getsize(weights) - 100)
    elif damage == "empty_bin":
        os.remove(weights)
        open(os.path.join(path, "pytorch_model.bin"), "w").close()
    else:
        os.rename(weights, os.path.join(path, "model-00001-of-00002.safetensors"))
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                      "b": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(ValueError, match="did not finish.*save the model again"):
        models.load_config(path)


def test_a_named_shape_is_built_on_the_device_asked_for():
    # on a GPU train.py builds a random shape there: its init then takes a moment, not the CPU's half minute (1B)
    shape = "shape:llama3.2-1b,num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4," \
            "num_key_value_heads=2,head_dim=16,vocab_size=256"
    built = models.load_model(shape, dtype=torch.float32, device="meta")
    assert {p.device.type for p in built.parameters()} == {"meta"}
    assert {p.device.type for p in models.load_model(shape, dtype=torch.float32).parameters()} == {"cpu"}
