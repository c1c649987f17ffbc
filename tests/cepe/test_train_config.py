"""cepe/train_config.py: every train_cepe.py flag is a typed field with a default; the CEPE fields come from the
flags (or an encoder config file); numbers that make no sense are refused naming the flag."""

from __future__ import annotations

import pytest

from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.train_config import cepe_config, parse_cepe_config


def test_defaults_and_the_cepe_fields_they_give():
    cfg = parse_cepe_config([])
    assert (cfg.stage, cfg.window, cfg.context_chunks, cfg.chunk_size, cfg.backend) == (
        "main", 256, 16, 256, "data_parallel")
    assert (cfg.kl_coef, cfg.kl_topk, cfg.kl_rest) == (0.0, 50, "bucket")
    assert cepe_config(cfg) == CEPEConfig()
    flags = ["--chunk-size", "64", "--encoder-layers", "3", "--encoder-hidden-size", "96", "--encoder-heads", "3",
             "--cross-layers", "2", "--init", "zero"]
    assert cepe_config(parse_cepe_config(flags)) == CEPEConfig(
        chunk_size=64, encoder_layers=3, encoder_hidden_size=96, encoder_heads=3, cross_layers=2, init="zero")


@pytest.mark.parametrize("flags, message", [
    (["--window", "0"], "--window must be at least 1"),
    (["--context-chunks", "0"], "--context-chunks must be at least 1"),
    (["--kl-coef", "-1"], "--kl-coef must be a finite number >= 0"),
    (["--lm-coef", "0"], "--lm-coef and --kl-coef are both 0"),
    (["--encoder-heads", "0"], "--encoder-heads must be at least 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--cepe", "/no/such/dir"], "--cepe '/no/such/dir' is not a directory"),
])
def test_nonsense_is_refused_naming_the_flag(flags, message):
    with pytest.raises(SystemExit, match=message):
        parse_cepe_config(flags)


def test_an_attention_backend_that_is_not_exact_is_no_choice(capsys):
    with pytest.raises(SystemExit):
        parse_cepe_config(["--backend", "s2attn"])
    assert "invalid choice: 's2attn'" in capsys.readouterr().err
