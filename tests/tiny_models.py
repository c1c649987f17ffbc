"""Tiny random Hugging Face decoders (float32, CPU) for integration tests; same seed -> same weights."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Small but real: GQA (4 query heads, 2 KV heads), 2 layers; qwen2 ties its input/output embeddings.
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=1024,
            attn_implementation="sdpa", use_cache=False)
PER_FAMILY = {"qwen2": dict(tie_word_embeddings=True)}


def tiny_model(family: str, seed: int, **overrides):
    """A freshly initialized ``family`` causal LM in float32 (sdpa attention) from ``seed``."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                  "gemma2": transformers.Gemma2Config}[family]
    config = config_cls(**{**BASE, **PER_FAMILY.get(family, {}), **overrides})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def batch(seed: int, size: int, seq: int, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [size, seq]; labels ignore (-100) the whole first half and some more tokens,
    so ranks hold different numbers of valid targets and some hold none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (size, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    labels[torch.rand(size, seq, generator=g) < 0.2] = -100
    return ids, labels
