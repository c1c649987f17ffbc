"""Load a causal LM and its tokenizer for long-context work: hub name, local path, a named shape, or the
built-in tiny default; RoPE settings (theta, scaling) applied to the config before the weights load.

RoPE is changed only when asked: ``rope_theta=None`` and ``rope_scaling=None`` keep the checkpoint's own
values (EasyContext's ``--rope-theta`` default silently reset every model to 1e5). In transformers 5 the
RoPE settings live in ``config.rope_parameters``; ``from_pretrained(rope_theta=...)`` is a TypeError.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import torch

from ..world.default import build_tokenizer

# Random-init shapes for benchmarks (no download): the published configs of these models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                        max_position_embeddings=131072, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
SHAPE_PREFIX = "shape:"
TINY = "tiny"  # the built-in default world (world/default.py): its model is built in the output directory
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def parse_rope_scaling(text: str | dict | None) -> dict | None:
    """A rope_scaling setting from a dict, a JSON object, or "type:key=value,..." (e.g.
    "yarn:factor=8,original_max_position_embeddings=4096"); None stays None. ValueError (saying what to pass)
    for text that does not parse and for values that would give NaN/inf positions (``check_rope``)."""
    if text is None:
        return None
    if isinstance(text, dict):
        scaling = dict(text)
    elif text.strip().startswith("{"):
        try:
            scaling = json.loads(text)
        except json.JSONDecodeError as e:
            example = '\'{"rope_type": "yarn", "factor": 8}\''
            raise ValueError(f"--rope-scaling {text!r} is not valid JSON ({e}): write a JSON object such as "
                             f"{example}, or the short form, e.g. yarn:factor=8") from None
    else:
        kind, _, rest = text.strip().partition(":")
        scaling = {"rope_type": kind}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--rope-scaling item {item!r} is not key=value (e.g. yarn:factor=8)")
            scaling[key.strip()] = _scalar(value.strip())
    kind = scaling.get("rope_type", scaling.pop("type", None))
    if kind not in ROPE_TYPES:
        raise ValueError(f"unknown rope scaling type {kind!r}: use one of {', '.join(ROPE_TYPES)}")
    scaling["rope_type"] = kind
    if kind not in ("default", "dynamic") and "factor" not in scaling and kind != "longrope":
        raise ValueError(f"rope scaling {kind!r} needs a factor (e.g. {kind}:factor=4)")
    check_rope(scaling)
    return scaling


def _scalar(value: str):
    # JSON (8, 1e6, true, [1, 2]), else a float Python reads (nan, inf: refused later by check_rope), else text
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_rope_theta(theta, flag: str = "--rope-theta") -> None:
    """Raise a ValueError unless ``theta`` (the RoPE base) is a finite number > 0; None (keep) passes."""
    if theta is not None and not (_number(theta) and math.isfinite(theta) and theta > 0):
        raise ValueError(f"{flag} must be a finite number > 0 (the RoPE base, e.g. --rope-theta 1e6); got {theta!r}")


# Numeric fields of rope_parameters that transformers' RoPE functions divide by or take logs of (> 0).
_POSITIVE_FIELDS = ("attention_factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")


def check_rope(rope: dict) -> None:
    """Raise a ValueError, naming what to pass, for RoPE parameters that give NaN/inf or meaningless positions:
    theta and factor not finite (factor < 1: transformers requires >= 1 for every scaled type), a field it
    divides by not > 0, beta_fast <= beta_slow, high_freq_factor <= low_freq_factor, bad longrope lists."""
    kind = rope.get("rope_type", "default")
    check_rope_theta(rope.get("rope_theta"), "--rope-scaling: rope_theta")
    factor = rope.get("factor")
    if (factor is not None or kind in ("linear", "yarn", "llama3")) and not (
            _number(factor) and math.isfinite(factor) and factor >= 1):
        raise ValueError(f"--rope-scaling: factor must be a finite number >= 1 (how many times longer the context "
                         f"gets, e.g. {kind}:factor=8); got {factor!r}")
    for key in _POSITIVE_FIELDS:
        v = rope.get(key)
        if v is not None and not (_number(v) and math.isfinite(v) and v > 0):
            raise ValueError(f"--rope-scaling: {key} must be a finite number > 0 (or leave it out for the "
                             f"default); got {v!r}")
    for key in ("mscale", "mscale_all_dim"):
        v = rope.get(key)
        if v is not None and not (_number(v) and math.isfinite(v)):
            raise ValueError(f"--rope-scaling: {key} must be a finite number (or leave it out); got {v!r}")
    original = rope.get("original_max_position_embeddings")
    if original is not None and not (_number(original) and original >= 1 and float(original).is_integer()):
        raise ValueError(f"--rope-scaling: original_max_position_embeddings must be a positive whole number of "
                         f"tokens (the length the model was trained at, or leave it out); got {original!r}")
    partial = rope.get("partial_rotary_factor")
    if partial is not None and not (_number(partial) and 0 < partial <= 1):
        raise ValueError(f"--rope-scaling: partial_rotary_factor must be in (0, 1]; got {partial!r}")
    for low, high, default in (("beta_slow", "beta_fast", (1, 32)), ("low_freq_factor", "high_freq_factor", None)):
        lo, hi = rope.get(low), rope.get(high)
        if default is not None:
            lo, hi = (default[0] if lo is None else lo), (default[1] if hi is None else hi)
        if lo is not None and hi is not None and not hi > lo:
            raise ValueError(f"--rope-scaling: {high} ({hi}) must be above {low} ({lo}); swap or change them")
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if (v is not None or kind == "longrope") and not (
                isinstance(v, list) and v and all(_number(x) and math.isfinite(x) and x > 0 for x in v)):
            raise ValueError(f"--rope-scaling: {key} must be a list of finite numbers > 0, one per rotary "
                             f"frequency (head_dim / 2 of them); got {v!r}")


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
        check_rope_theta(rope_theta)
        rope["rope_theta"] = float(rope_theta)
    if scaling is not None or rope_theta is not None:
        check_rope(rope)  # what the checkpoint brings, merged with what was asked
    config.rope_parameters = rope
    if max_position_embeddings is not None and max_position_embeddings > (original_max or 0):
        config.max_position_embeddings = max_position_embeddings
    return config


def is_shape(name: str) -> bool:
    return name.startswith(SHAPE_PREFIX)


def shape_config(name: str, **overrides):
    """The config of a named shape (``SHAPES``: "shape:llama3-8b", "shape:qwen2.5-7b", ...; fields overridable as
    keyword arguments or in the name: "shape:llama3-8b,num_hidden_layers=2") for random-init benchmarks."""
    from transformers import AutoConfig, LlamaConfig

    key = name[len(SHAPE_PREFIX):] if is_shape(name) else name
    key, *fields = key.split(",")
    for field in fields:
        k, sep, v = field.partition("=")
        if not sep:
            raise ValueError(f"model shape field {field!r} is not key=value (e.g. num_hidden_layers=2)")
        overrides.setdefault(k, json.loads(v))
    if key not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}: use one of {', '.join(SHAPE_PREFIX + s for s in SHAPES)}")
    fields = {**SHAPES[key], **overrides}
    model_type = fields.pop("model_type", "llama")
    config = LlamaConfig(**fields) if model_type == "llama" else AutoConfig.for_model(model_type, **fields)
    heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    if heads % kv_heads or hidden % heads:
        raise ValueError(f"model shape {name!r}: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads}) and divide hidden_size ({hidden}); change the overrides")
    return config


def check_model_source(name_or_path: str, *, weights: bool = True, flag: str = "--model") -> None:
    """Before anything loads: raise a ValueError saying what to change if ``name_or_path`` looks like a local path
    that does not exist, or names a folder with an empty or truncated weight file (an interrupted save or
    download; transformers would fail with a bare EOFError or safetensors header error). Hub names pass."""
    if is_shape(name_or_path) or name_or_path == TINY:
        return
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path):
        first = path.split("/")[0]
        if path.startswith(("/", ".", "~")) or path.count("/") > 1 or (first and os.path.isdir(first)):
            raise ValueError(f"{flag} {name_or_path!r} does not exist: pass the folder that holds config.json "
                             "(train.py saves OUTPUT/model), a hub name such as org/model, shape:llama2-7b or tiny")
        return
    if not weights or not os.path.isdir(path):
        return
    for name, why in _broken_weight_files(path):
        raise ValueError(f"{flag} {name_or_path!r}: {name} {why}: the save or download that wrote it did not "
                         "finish; save the model again (or download it again), or pass another --model")


def _broken_weight_files(path: str):
    """(file name, what is wrong) for each empty, truncated or missing weight file of a model folder."""
    names = set(os.listdir(path))
    for index in sorted(n for n in names if n.endswith(".index.json")):
        try:
            with open(os.path.join(path, index)) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            yield index, "is not a valid JSON index"
            continue
        for shard in sorted(shards - names):
            yield shard, f"is listed in {index} but missing"
    for name in sorted(names):
        if not name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        size = os.path.getsize(os.path.join(path, name))
        if size == 0:
            yield name, "is empty (0 bytes)"
        elif name.endswith(".safetensors") and _safetensors_end(os.path.join(path, name)) > size:
            yield name, f"is truncated ({size} bytes, fewer than its own header lists)"


def _safetensors_end(path: str) -> float:
    """The byte length a .safetensors file's header says it has (8-byte length, JSON header, tensor data);
    inf when the header itself is cut short or unreadable."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > 100_000_000:
            return math.inf
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return math.inf
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    return 8 + n + max(ends, default=0)


def load_config(name_or_path: str, *, rope_theta: float | None = None, rope_scaling: str | dict | None = None,
                max_position_embeddings: int | None = None, **shape_overrides):
    """The model config of a hub name, local path or named shape, with RoPE settings applied (``apply_rope``)."""
    check_model_source(name_or_path)
    if is_shape(name_or_path):
        config = shape_config(name_or_path, **shape_overrides)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
    return apply_rope(config, rope_theta=rope_theta, rope_scaling=rope_scaling,
                      max_position_embeddings=max_position_embeddings)


def parameter_count(config) -> int:
    """The parameters of a causal LM of ``config``, counted on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.bfloat16, rope_theta: float | None = None,
               rope_scaling: str | dict | None = None, max_position_embeddings: int | None = None,
               attn_implementation: str = "sdpa", config=None, device: str | torch.device | None = None,
               **shape_overrides):
    """A causal LM: pretrained weights for a hub name / local path, random init (seeded by the caller)
    for a named shape, built on ``device`` (default: the CPU); RoPE settings applied to the config before the
    weights load (``load_config``)."""
    from transformers import AutoModelForCausalLM

    if config is None:
        config = load_config(name_or_path, rope_theta=rope_theta, rope_scaling=rope_scaling,
                             max_position_embeddings=max_position_embeddings, **shape_overrides)
    config.use_cache = False
    if is_shape(name_or_path):
        with torch.device(device) if device is not None else contextlib.nullcontext():  # None: ZeRO-3's zero.Init
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype,
                                                attn_implementation=attn_implementation)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub name or local path ("tiny": the built-in one, e.g. beside a random ``shape:``
    model), with no length limit (long-context use) and a pad token."""
    if name_or_path == TINY:
        return build_tokenizer()
    check_model_source(name_or_path, weights=False, flag="--model/--tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.model_max_length = int(1e12)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def position_limit(config) -> int:
    """The longest context a config's RoPE settings were made for: max_position_embeddings, or the original
    limit x the factor of a RoPE scaling (dynamic NTK included: it rescales up to that length as the others do)."""
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" and "factor" in rope:
        base = int(rope.get("original_max_position_embeddings", limit))
        limit = max(limit, int(base * float(rope["factor"])))
    return limit
