"""Load a causal LM and its tokenizer for long-context work: hub name, local path, a named shape, or the
built-in tiny default; RoPE settings (theta, scaling) applied to the config before the weights load.

RoPE is changed only when asked: ``rope_theta=None`` and ``rope_scaling=None`` keep the checkpoint's own
values (EasyContext's ``--rope-theta`` default silently reset every model to 1e5). In transformers 5 the
RoPE settings live in ``config.rope_parameters``; ``from_pretrained(rope_theta=...)`` is a TypeError.
"""

from __future__ import annotations

import json
from typing import Any

import torch

# Random-init shapes for benchmarks (no download): the published configs of these models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
SHAPE_PREFIX = "shape:"
TINY = "tiny"  # the built-in default world (tiny.py): its model is built in the output directory
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def parse_rope_scaling(text: str | dict | None) -> dict | None:
    """A rope_scaling setting from a dict, a JSON object, or "type:key=value,..." (e.g.
    "yarn:factor=8,original_max_position_embeddings=4096"); None stays None."""
    if text is None or isinstance(text, dict):
        return text
    text = text.strip()
    if text.startswith("{"):
        scaling = json.loads(text)
    else:
        kind, _, rest = text.partition(":")
        scaling = {"rope_type": kind}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"rope scaling item {item!r} is not key=value (e.g. factor=8)")
            scaling[key.strip()] = json.loads(value) if value.strip()[:1] in "0123456789.-[{tf" else value
    kind = scaling.get("rope_type", scaling.pop("type", None))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope scaling type {kind!r}: use one of {', '.join(ROPE_TYPES)}")
    scaling["rope_type"] = kind
    if kind not in ("default", "dynamic") and "factor" not in scaling and kind != "longrope":
        raise ValueError(f"rope scaling {kind!r} needs a factor (e.g. {kind}:factor=4)")
    return scaling


def apply_rope(config, *, rope_theta: float | None = None, rope_scaling: str | dict | None = None,
               max_position_embeddings: int | None = None):
    """Set RoPE theta / scaling / the position limit on ``config`` (in place) and return it; None keeps a value.

    A scaling's ``original_max_position_embeddings`` defaults to the config's position limit before any
    change, as yarn/llama3/dynamic expect.
    """
    rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
    original_max = getattr(config, "max_position_embeddings", None)
    scaling = parse_rope_scaling(rope_scaling)
    if scaling is not None:
        theta = rope.get("rope_theta")
        rope = {**scaling}
        rope.setdefault("rope_theta", theta)
        if scaling["rope_type"] in ("yarn", "llama3", "dynamic", "longrope") and original_max:
            rope.setdefault("original_max_position_embeddings", original_max)
    if rope_theta is not None:
        if rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive; got {rope_theta}")
        rope["rope_theta"] = float(rope_theta)
    config.rope_parameters = rope
    if max_position_embeddings is not None and max_position_embeddings > (original_max or 0):
        config.max_position_embeddings = max_position_embeddings
    return config


def is_shape(name: str) -> bool:
    return name.startswith(SHAPE_PREFIX)


def shape_config(name: str, **overrides):
    """A LlamaConfig of a named shape ("shape:llama2-7b", "shape:llama3-8b"; fields overridable as keyword
    arguments or in the name: "shape:llama3-8b,num_hidden_layers=2") for random-init benchmarks."""
    from transformers import LlamaConfig

    key = name[len(SHAPE_PREFIX):] if is_shape(name) else name
    key, *fields = key.split(",")
    for field in fields:
        k, sep, v = field.partition("=")
        if not sep:
            raise ValueError(f"model shape field {field!r} is not key=value (e.g. num_hidden_layers=2)")
        overrides.setdefault(k, json.loads(v))
    if key not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}: use one of {', '.join(SHAPE_PREFIX + s for s in SHAPES)}")
    config = LlamaConfig(**{**SHAPES[key], **overrides})
    heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    if heads % kv_heads or hidden % heads:
        raise ValueError(f"model shape {name!r}: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads}) and divide hidden_size ({hidden}); change the overrides")
    return config


def load_config(name_or_path: str, *, rope_theta: float | None = None, rope_scaling: str | dict | None = None,
                max_position_embeddings: int | None = None, **shape_overrides):
    """The model config of a hub name, local path or named shape, with RoPE settings applied (``apply_rope``)."""
    if is_shape(name_or_path):
        config = shape_config(name_or_path, **shape_overrides)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
    return apply_rope(config, rope_theta=rope_theta, rope_scaling=rope_scaling,
                      max_position_embeddings=max_position_embeddings)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.bfloat16, rope_theta: float | None = None,
               rope_scaling: str | dict | None = None, max_position_embeddings: int | None = None,
               attn_implementation: str = "sdpa", config=None, **shape_overrides):
    """A causal LM: pretrained weights for a hub name / local path, random init (seeded by the caller)
    for a named shape; RoPE settings applied to the config before the weights load (``load_config``)."""
    from transformers import AutoModelForCausalLM

    if config is None:
        config = load_config(name_or_path, rope_theta=rope_theta, rope_scaling=rope_scaling,
                             max_position_embeddings=max_position_embeddings, **shape_overrides)
    config.use_cache = False
    if is_shape(name_or_path):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype,
                                                attn_implementation=attn_implementation)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub name or local path ("tiny": the built-in one, e.g. beside a random ``shape:``
    model), with no length limit (long-context use) and a pad token."""
    if name_or_path == TINY:
        from .tiny import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.model_max_length = int(1e12)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def position_limit(config) -> int:
    """The longest context a config's RoPE settings were made for (max_position_embeddings x scaling factor
    for scaled RoPE other than dynamic)."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "dynamic") and "factor" in rope:
        base = int(rope.get("original_max_position_embeddings", limit))
        limit = max(limit, int(base * float(rope["factor"])))
    return limit
