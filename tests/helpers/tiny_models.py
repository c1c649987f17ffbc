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


def pose_training_losses(model, ids: torch.Tensor, labels: torch.Tensor, target: int, seed: int,
                         steps: int = 5, lr: float = 1e-2) -> list[float]:
    """Losses of ``steps`` AdamW steps of ``model`` (its trainable parameters) on one batch, with PoSE position
    ids over ``target`` resampled every step (1 process, ring layout)."""
    from easy_context.hf.causal_lm import causal_lm_loss
    from easy_context.parallel.inputs import prepare_seq_parallel_inputs
    from easy_context.train.pose import pose_position_ids

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        pos = torch.stack([pose_position_ids(ids.shape[1], target, generator=g) for _ in range(ids.shape[0])])
        inp = prepare_seq_parallel_inputs("ring", ids, labels, pos, allow_position_skips=True)
        loss = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
