"""Tiny CEPE models for the tests: a tiny HF decoder (tests/helpers/tiny_models.py) with a 2-layer encoder."""

from __future__ import annotations

import torch

from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.model import CEPEModel, build_cepe
from tests.helpers.tiny_models import tiny_model

CHUNK = 8
# 32 wide (the decoder: 64), 2 heads of 16, 2 layers: small, but GQA-free attention over real chunks
FIELDS = dict(chunk_size=CHUNK, encoder_layers=2, encoder_hidden_size=32, encoder_heads=2)


def tiny_cepe(family: str = "llama", seed: int = 0, *, dtype: torch.dtype = torch.float32, init: str = "copy",
              **fields) -> CEPEModel:
    """A tiny CEPE model around ``tiny_model(family, seed)``; encoder and cross-attention drawn from seed + 1."""
    decoder = tiny_model(family, seed).to(dtype)
    torch.manual_seed(seed + 1)
    return build_cepe(decoder, CEPEConfig(**{**FIELDS, **fields}), init=init)


def chunks(seed: int, batch: int, n: int, vocab: int = 128) -> torch.Tensor:
    """Random encoder chunk ids [batch, n, CHUNK]."""
    return torch.randint(vocab, (batch, n, CHUNK), generator=torch.Generator().manual_seed(seed))
