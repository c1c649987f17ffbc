"""cepe/encoder.py: every chunk is encoded on its own and bidirectionally, positions restarting in each chunk;
padding is never attended to."""

from __future__ import annotations

import torch

from easy_context.cepe.config import CEPEConfig, resolve_config
from easy_context.cepe.encoder import ContextEncoder, encoder_config
from tests.cepe.tiny import CHUNK, FIELDS, chunks
from tests.helpers.tiny_models import tiny_model


def encoder(seed: int = 0) -> ContextEncoder:
    cfg = resolve_config(CEPEConfig(**FIELDS), tiny_model("llama", 0).config)
    torch.manual_seed(seed)
    return ContextEncoder(encoder_config(cfg, vocab_size=128)).double().eval()


def test_changing_one_chunk_changes_only_its_own_states():
    enc, ids = encoder(), chunks(0, 2, 4)
    before, _ = enc(ids)
    changed = ids.clone()
    changed[1, 2, 3] = (changed[1, 2, 3] + 1) % 128
    after, _ = enc(changed)
    moved = (after - before).abs().amax(dim=-1).view(2, 4, CHUNK).amax(dim=-1)  # per (row, chunk)
    assert moved[1, 2] > 1e-6
    moved[1, 2] = 0
    assert moved.max() == 0, "another chunk's states changed: chunks must be encoded independently"


def test_positions_restart_in_every_chunk_and_attention_is_bidirectional():
    enc, ids = encoder(), chunks(1, 1, 3)
    ids[0, 2] = ids[0, 0]  # the same chunk in two places: the same states
    states, _ = enc(ids)
    per_chunk = states.view(1, 3, CHUNK, -1)
    torch.testing.assert_close(per_chunk[0, 2], per_chunk[0, 0], rtol=0, atol=1e-12)
    later = ids.clone()
    later[0, 0, -1] = (later[0, 0, -1] + 1) % 128  # the last token of a chunk reaches its first one
    assert (enc(later)[0][0, 0] - states[0, 0]).abs().max() > 1e-6


def test_padding_is_never_attended_to():
    enc, ids = encoder(), chunks(2, 2, 3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 1, 5:] = False  # a chunk ending in padding
    mask[1, 2] = False  # a chunk of padding only
    states, flat_mask = enc(ids, mask)
    other = torch.where(mask, ids, (ids + 7) % 128)  # other ids under the padding
    states2, _ = enc(other, mask)
    real = flat_mask
    torch.testing.assert_close(states2[real], states[real], rtol=0, atol=1e-12)
    assert torch.isfinite(states).all()
    alone, _ = enc(ids[:1, 1:2, :5])  # the padded chunk's real tokens, encoded without the padding
    torch.testing.assert_close(states[0, CHUNK:CHUNK + 5], alone[0], rtol=0, atol=1e-12)
    assert flat_mask.shape == (2, 3 * CHUNK) and enc(ids, torch.ones_like(mask))[1] is None
