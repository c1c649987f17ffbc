"""cepe/config.py: what cannot work is refused from configs alone, before any weights load, with a message that
says what to change; what can work resolves to concrete encoder numbers (the paper's 1024-wide encoder for a
Llama-2-7B-shaped decoder)."""

from __future__ import annotations

import json

import pytest
import transformers

from easy_context.cepe.config import (CEPEConfig, check_lengths, check_teacher, config_from_encoder_file,
                                      cross_layer_indices, resolve_config)
from easy_context.hf.models import shape_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=256)


def llama(**over):
    return transformers.LlamaConfig(**{**TINY, **over})


def test_a_llama2_7b_shape_gets_the_papers_encoder_and_every_layer_crossed():
    cfg = resolve_config(CEPEConfig(encoder_layers=24), shape_config("shape:llama2-7b"))
    assert (cfg.encoder_hidden_size, cfg.encoder_heads, cfg.encoder_kv_heads, cfg.encoder_intermediate_size) == (
        1024, 16, 16, 4096)
    assert cfg.cross_layers == 32 and cfg.chunk_size == 256 and cfg.init == "copy"
    assert resolve_config(cfg, shape_config("shape:llama2-7b")) == cfg  # resolved once, resolved for good


def test_cross_attention_goes_into_the_last_layers():
    assert cross_layer_indices(CEPEConfig(cross_layers=3), 8) == [5, 6, 7]
    assert cross_layer_indices(CEPEConfig(), 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", ["gemma2", "phi3", "gpt2"])
def test_a_family_whose_layers_cannot_be_wrapped_is_refused(family):
    config = {"gemma2": lambda: transformers.Gemma2Config(**TINY), "phi3": lambda: transformers.Phi3Config(**TINY),
              "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4)}[family]()
    with pytest.raises(ValueError, match=f"cannot wrap the decoder layers of model type '{family}'.*llama"):
        resolve_config(CEPEConfig(), config)


@pytest.mark.parametrize("fields, message", [
    (dict(encoder_hidden_size=96, encoder_heads=5), "encoder width 96 does not divide into 5 heads"),
    (dict(encoder_hidden_size=100), "not a multiple of 64: give --encoder-heads"),
    (dict(encoder_hidden_size=64, encoder_heads=4, encoder_kv_heads=3), "--encoder-kv-heads 3 must divide"),
    (dict(encoder_hidden_size=128, encoder_heads=2), "encoder width 128 is wider; use --encoder-hidden-size <= 64"),
    (dict(cross_layers=3), "the decoder has 2 layers; give 1 to 2"),
    (dict(chunk_size=1024, encoder_max_positions=512), "--chunk-size 1024 is longer than the encoder's position"),
    (dict(init="ones"), "--init 'ones': use one of copy, zero, normal"),
])
def test_encoder_and_cross_attention_that_cannot_fit_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(CEPEConfig(**fields), llama())


def test_a_wider_encoder_is_fine_when_nothing_is_copied():
    cfg = resolve_config(CEPEConfig(encoder_hidden_size=128, encoder_heads=2, init="normal"), llama())
    assert cfg.encoder_hidden_size == 128


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=512, context_chunks=4, chunk_size=64), "--window 512 is longer than the decoder's position limit"),
    (dict(window=100, context_chunks=4, chunk_size=64, stage="warmup"), "--window 100 is not a multiple of"),
    (dict(window=128, context_chunks=0, chunk_size=64), "--context-chunks must be a positive"),
    (dict(window=128, context_chunks=2, chunk_size=64, sp_size=4), "2 encoder chunks cannot give each of the 4"),
    (dict(window=128, context_chunks=2, chunk_size=600), "--chunk-size 600 is longer than the encoder's"),
    (dict(window=1, context_chunks=2, chunk_size=64), "at least 2 tokens"),
])
def test_a_window_or_chunk_length_that_does_not_fit_is_refused(kwargs, message):
    cfg = resolve_config(CEPEConfig(chunk_size=64, encoder_hidden_size=64), llama())
    with pytest.raises(ValueError, match=message):
        check_lengths(cfg, llama(), **kwargs)


def test_lengths_that_fit_pass():
    cfg = resolve_config(CEPEConfig(chunk_size=64, encoder_hidden_size=64), llama())
    check_lengths(cfg, llama(), window=256, context_chunks=512, chunk_size=64, sp_size=2)
    check_lengths(cfg, llama(), window=256, context_chunks=1, chunk_size=64, stage="warmup", sp_size=4)


def test_a_teacher_with_another_vocabulary_or_too_short_a_context_is_refused():
    with pytest.raises(ValueError, match="vocabulary has 200 tokens and the decoder's 128"):
        check_teacher(llama(vocab_size=200), llama(), tokens=128)
    with pytest.raises(ValueError, match="bos_token_id is 5 and the decoder's 1"):
        check_teacher(llama(bos_token_id=5), llama(bos_token_id=1), tokens=128)
    with pytest.raises(ValueError, match="context \\+ window = 300 tokens, beyond its position limit 256"):
        check_teacher(llama(), llama(), tokens=300)
    check_teacher(llama(), llama(), tokens=256)


def test_the_encoder_shape_can_come_from_a_llama_config_file(tmp_path):
    llama(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=5,
          intermediate_size=96).save_pretrained(tmp_path)
    cfg = resolve_config(config_from_encoder_file(CEPEConfig(), str(tmp_path)), llama())
    assert (cfg.encoder_layers, cfg.encoder_hidden_size, cfg.encoder_heads, cfg.encoder_kv_heads,
            cfg.encoder_intermediate_size) == (5, 48, 3, 1, 96)
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="the CEPE encoder is a Llama-architecture stack"):
        config_from_encoder_file(CEPEConfig(), str(tmp_path / "gpt2.json"))


def test_saved_fields_round_trip_and_unknown_ones_are_named():
    cfg = resolve_config(CEPEConfig(), llama())
    assert CEPEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown CEPE config fields \\['wings'\\]"):
        CEPEConfig.from_dict({**cfg.to_dict(), "wings": 2})
