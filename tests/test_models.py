"""models.py: RoPE settings change only when asked and land in the config; named shapes; position limits."""

import pytest
import torch

from easy_context import models


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
    from easy_context import tiny

    path = tiny.build_world(str(tmp_path / "w"))
    model = models.load_model(path, dtype=torch.float32, rope_theta=1e6)
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert models.load_tokenizer(path).eos_token == "</s>"


def test_tiny_tokenizer_by_name_is_the_one_saved_with_the_tiny_world(tmp_path):
    from easy_context import tiny

    saved = models.load_tokenizer(tiny.build_world(str(tmp_path / "w")))
    built = models.load_tokenizer(models.TINY)
    text = "The special magic Singapore number is 4072913."
    assert built(text).input_ids == saved(text).input_ids and built.pad_token == saved.pad_token
