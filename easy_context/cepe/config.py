"""A CEPE model's own fields (encoder shape, chunk length, which decoder layers get cross-attention, how they start)
and the checks that refuse what cannot work, from configs alone, before any weights load.

``CEPEConfig`` may leave the encoder's shape open (None); ``resolve_config`` fills it from the decoder's config
(width a quarter of the decoder's, between 256 and the decoder's own; 64-wide heads; MLP 4x the width: Llama-2-7B
gets the paper's 1024-wide encoder) and checks everything, so a saved model records concrete numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from ..hf.models import position_limit

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
INIT_MODES = ("copy", "zero", "normal")
STAGES = ("warmup", "main")
HEAD_WIDTH = 64  # default encoder head width (the paper's encoder: 1024 wide, 16 heads)


@dataclass(frozen=True)
class CEPEConfig:
    """The CEPE fields of a model: encoder shape (None: derived from the decoder by ``resolve_config``), the
    default chunk length, the number of last decoder layers with cross-attention (None: all) and their init."""

    chunk_size: int = 256
    encoder_layers: int = 4
    encoder_hidden_size: int | None = None
    encoder_heads: int | None = None
    encoder_kv_heads: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_max_positions: int | None = None
    encoder_rms_norm_eps: float = 1e-5
    encoder_rope_theta: float = 10000.0
    cross_layers: int | None = None
    init: str = "copy"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> CEPEConfig:
        """The config of ``fields`` (a saved model's); ValueError naming unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown CEPE config fields {unknown}: this easy_context knows {sorted(known)}")
        return cls(**fields)


def decoder_head_dim(decoder_config) -> int:
    """The decoder's attention head width (``head_dim``, else hidden_size / num_attention_heads)."""
    return getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // decoder_config.num_attention_heads


def check_family(decoder_config) -> None:
    """ValueError unless CEPE can wrap this decoder's layers (pre-norm self-attention, then pre-norm MLP)."""
    kind = getattr(decoder_config, "model_type", type(decoder_config).__name__)
    if kind not in SUPPORTED_FAMILIES:
        raise ValueError(f"CEPE cannot wrap the decoder layers of model type {kind!r}: it inserts cross-attention "
                         f"between self-attention and the MLP of layers it knows, those of "
                         f"{', '.join(SUPPORTED_FAMILIES)} models; use a decoder of one of those families")


def _encoder_config_file(path: str) -> dict:
    """The fields of a Llama config.json (``path``: the file or the folder holding it)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            fields = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--encoder-config {path!r}: cannot read a config.json there ({e})") from None
    if fields.get("model_type", "llama") != "llama":
        raise ValueError(f"--encoder-config {path!r} is a {fields['model_type']!r} config: the CEPE encoder is a "
                         "Llama-architecture stack; give a llama config")
    return fields


def config_from_encoder_file(cfg: CEPEConfig, path: str) -> CEPEConfig:
    """``cfg`` with its encoder shape taken from the Llama config at ``path``."""
    f = _encoder_config_file(path)
    return dataclasses.replace(
        cfg, encoder_layers=f["num_hidden_layers"], encoder_hidden_size=f["hidden_size"],
        encoder_heads=f["num_attention_heads"], encoder_kv_heads=f.get("num_key_value_heads"),
        encoder_intermediate_size=f["intermediate_size"],
        encoder_max_positions=f.get("max_position_embeddings"), encoder_rms_norm_eps=f.get("rms_norm_eps", 1e-5),
        encoder_rope_theta=(f.get("rope_parameters") or {}).get("rope_theta", f.get("rope_theta", 10000.0)))


def _positive(flag: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag} must be a positive whole number; got {value!r}")


def resolve_config(cfg: CEPEConfig, decoder_config) -> CEPEConfig:
    """``cfg`` with every open encoder field filled from ``decoder_config`` (module doc), once checked: ValueError,
    saying what to change, for a decoder family CEPE cannot wrap, an encoder width its heads do not divide, more
    cross-attention layers than the decoder has, a width ``copy`` init cannot slice from the decoder's."""
    check_family(decoder_config)
    if cfg.init not in INIT_MODES:
        raise ValueError(f"--init {cfg.init!r}: use one of {', '.join(INIT_MODES)}")
    hidden = decoder_config.hidden_size
    width = cfg.encoder_hidden_size or min(hidden, max(256, hidden // 4))
    _positive("--encoder-hidden-size", width)
    heads = cfg.encoder_heads or (width // HEAD_WIDTH if width % HEAD_WIDTH == 0 else None)
    if heads is None:
        raise ValueError(f"--encoder-hidden-size {width} is not a multiple of {HEAD_WIDTH}: give --encoder-heads "
                         f"too (a number of heads that divides {width})")
    kv_heads = cfg.encoder_kv_heads or heads
    for name, value in (("--encoder-layers", cfg.encoder_layers), ("--encoder-heads", heads),
                        ("--encoder-kv-heads", kv_heads), ("--chunk-size", cfg.chunk_size)):
        _positive(name, value)
    if width % heads:
        raise ValueError(f"the encoder width {width} does not divide into {heads} heads: choose "
                         f"--encoder-heads among {[d for d in range(1, width + 1) if width % d == 0][:12]}... or "
                         "another --encoder-hidden-size")
    if heads % kv_heads:
        raise ValueError(f"--encoder-kv-heads {kv_heads} must divide --encoder-heads {heads}")
    max_positions = cfg.encoder_max_positions or max(cfg.chunk_size, 512)
    if cfg.chunk_size > max_positions:
        raise ValueError(f"--chunk-size {cfg.chunk_size} is longer than the encoder's position limit "
                         f"{max_positions}: use chunks of at most {max_positions} tokens")
    layers = decoder_config.num_hidden_layers
    cross = layers if cfg.cross_layers is None else cfg.cross_layers
    if not isinstance(cross, int) or not 1 <= cross <= layers:
        raise ValueError(f"--cross-layers {cfg.cross_layers}: the decoder has {layers} layers; give 1 to {layers} "
                         "(cross-attention in that many last layers), or leave it out for all")
    if cfg.init == "copy" and width > hidden:
        raise ValueError(f"--init copy slices each cross-attention's key/value weights from the layer's "
                         f"self-attention, which reads {hidden} features: the encoder width {width} is wider; "
                         f"use --encoder-hidden-size <= {hidden}, or --init normal / zero")
    return dataclasses.replace(cfg, encoder_hidden_size=width, encoder_heads=heads, encoder_kv_heads=kv_heads,
                               encoder_intermediate_size=cfg.encoder_intermediate_size or 4 * width,
                               encoder_max_positions=max_positions, cross_layers=cross)


def cross_layer_indices(cfg: CEPEConfig, num_layers: int) -> list[int]:
    """The decoder layers that get cross-attention: the last ``cfg.cross_layers`` (all when None)."""
    k = num_layers if cfg.cross_layers is None else cfg.cross_layers
    return list(range(num_layers - k, num_layers))


def check_lengths(cfg: CEPEConfig, decoder_config, *, window: int, context_chunks: int, chunk_size: int,
                  stage: str = "main", sp_size: int = 1, allow_extrapolation: bool = False) -> None:
    """ValueError, saying what to change, unless a ``window``-token decoder window and ``context_chunks`` encoder
    chunks of ``chunk_size`` tokens fit: the window within the decoder's position limit, the chunks within the
    encoder's; in the warmup stage (encoder sees the window itself) chunks that tile the window exactly; at least
    one chunk per rank of an ``sp_size`` group (each rank encodes its own)."""
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: use one of {', '.join(STAGES)}")
    for flag, value in (("--window", window), ("--chunk-size", chunk_size)):
        _positive(flag, value)
    if window < 2:
        raise ValueError(f"--window {window}: a decoder window needs at least 2 tokens (one predicts the other)")
    limit = position_limit(decoder_config)
    if limit and window > limit and not allow_extrapolation:
        raise ValueError(f"--window {window} is longer than the decoder's position limit {limit}: CEPE keeps the "
                         f"decoder at its own length; use --window <= {limit} and put the rest in encoder chunks")
    encoder_limit = cfg.encoder_max_positions or max(cfg.chunk_size, 512)
    if chunk_size > encoder_limit:
        raise ValueError(f"--chunk-size {chunk_size} is longer than the encoder's position limit {encoder_limit}: "
                         f"use chunks of at most {encoder_limit} tokens")
    if stage == "warmup" and window % chunk_size:
        raise ValueError(f"the warmup stage gives the encoder the decoder's own window in chunks: --window {window} "
                         f"is not a multiple of --chunk-size {chunk_size}; make it one (e.g. --window "
                         f"{max(chunk_size, window - window % chunk_size)})")
    chunks = window // chunk_size if stage == "warmup" else context_chunks
    if stage == "main":
        _positive("--context-chunks", context_chunks)
    if chunks < sp_size:
        raise ValueError(f"{chunks} encoder chunks cannot give each of the {sp_size} sequence-parallel ranks one to "
                         f"encode: use at least {sp_size} chunks (--context-chunks, or a longer --window in warmup)")


def check_teacher(teacher_config, decoder_config, *, tokens: int) -> None:
    """ValueError unless a teacher with ``teacher_config`` can label the student's tokens: the same vocabulary
    (size, BOS/EOS ids), and ``tokens`` (context + window, what it reads) within its position limit."""
    sizes = (teacher_config.vocab_size, decoder_config.vocab_size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"the teacher's vocabulary has {sizes[0]} tokens and the decoder's {sizes[1]}: its top-k "
                         "token ids would name other tokens; distill from a teacher with the decoder's tokenizer")
    for name in ("bos_token_id", "eos_token_id"):
        a, b = getattr(teacher_config, name, None), getattr(decoder_config, name, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the teacher's {name} is {a} and the decoder's {b}: they tokenize differently; "
                             "distill from a teacher with the decoder's tokenizer")
    limit = position_limit(teacher_config)
    if limit and tokens > limit:
        raise ValueError(f"the teacher reads context + window = {tokens} tokens, beyond its position limit {limit}: "
                         f"use fewer --context-chunks so that they fit in {limit}")
