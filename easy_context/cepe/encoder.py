"""CEPE's context encoder: a bidirectional Llama-architecture stack (transformers' ``LlamaModel``, its attention
not causal) that encodes every chunk of the context on its own, positions restarting at 0 in each chunk.

The chunks of a batch run as one batch of rows, so they cannot see each other: changing one chunk changes only
its own states. Padding (mask False) is never attended to; a chunk of padding only attends within itself, so its
states stay finite (the cross-attention's mask keeps them out).
"""

from __future__ import annotations

import torch

from .config import CEPEConfig

Tensor = torch.Tensor


def encoder_config(cfg: CEPEConfig, *, vocab_size: int, pad_token_id: int | None = None):
    """The LlamaConfig of the encoder of a resolved ``cfg`` (``config.resolve_config``), on the decoder's vocabulary."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=cfg.encoder_hidden_size, intermediate_size=cfg.encoder_intermediate_size,
                         num_hidden_layers=cfg.encoder_layers, num_attention_heads=cfg.encoder_heads,
                         num_key_value_heads=cfg.encoder_kv_heads, vocab_size=vocab_size,
                         max_position_embeddings=cfg.encoder_max_positions, rms_norm_eps=cfg.encoder_rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": float(cfg.encoder_rope_theta)},
                         pad_token_id=pad_token_id, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"  # takes a boolean padding mask and is_causal=False
    return config


class ContextEncoder(torch.nn.Module):
    """Encodes context chunks independently and bidirectionally (module doc); parameters under ``model``."""

    def __init__(self, config):
        super().__init__()
        from transformers import LlamaModel

        self.model = LlamaModel(config)
        for layer in self.model.layers:
            layer.self_attn.is_causal = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, chunk_ids: Tensor, chunk_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """chunk_ids [B, n, c] (``chunk_mask`` [B, n, c], True for real tokens; None: all real) -> (states
        [B, n * c, hidden], mask [B, n * c] or None), chunk after chunk."""
        if chunk_ids.dim() != 3:
            raise ValueError(f"encoder chunk ids must be [batch, chunks, chunk_len]; got {tuple(chunk_ids.shape)}")
        b, n, c = chunk_ids.shape
        limit = self.model.config.max_position_embeddings
        if c > limit:
            raise ValueError(f"encoder chunks of {c} tokens exceed the encoder's position limit {limit}")
        rows = chunk_ids.reshape(b * n, c)
        hidden = self.model.embed_tokens(rows)
        positions = torch.arange(c, device=rows.device).expand(b * n, c)
        rope = self.model.rotary_emb(hidden, position_ids=positions)
        attend = None
        if chunk_mask is not None:
            if chunk_mask.shape != chunk_ids.shape:
                raise ValueError(f"encoder mask {tuple(chunk_mask.shape)} must match the chunk ids "
                                 f"{tuple(chunk_ids.shape)}")
            keys = chunk_mask.reshape(b * n, c).bool()
            keys = keys | ~keys.any(dim=1, keepdim=True)  # an all-padding chunk: no row without a key (no NaN)
            attend = None if bool(keys.all()) else keys[:, None, None, :]
        for layer in self.model.layers:
            hidden = layer(hidden, attention_mask=attend, position_embeddings=rope, position_ids=positions,
                           is_causal=False)
        hidden = self.model.norm(hidden)
        mask = None if chunk_mask is None or bool(chunk_mask.all()) else chunk_mask.reshape(b, n * c).bool()
        return hidden.reshape(b, n * c, -1), mask
