"""Which models a backend can run sequence-parallel, decided from the config before any weights load.

Models whose sequence mixing is not (only) attention -- recurrent, state-space, convolutional or linear-attention
layers -- are refused: split across ranks those layers would each see only their shard. Backends that split the
q heads over an all-to-all group (Ulysses, USP's Ulysses part) need a head count that group's size divides.
"""

from __future__ import annotations

import re

from ..attention.registry import Backend, get_backend
from ..attention.ulysses import head_split_error
from ..parallel.plan import ParallelPlan

# Layer kinds (config.layer_types and the like) these backends compute exactly: causal softmax attention over the
# whole sequence (sliding / chunked windows are checked against the sequence at run time) and feed-forward layers.
_EXACT_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention",
                           "mlp", "moe", "dense", "sparse"})
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")
# Config fields only recurrent / state-space / convolutional / linear-attention sequence mixers have.
_MIXER_FIELDS = re.compile(r"(mamba_|ssm_|linear_(conv|num|key|value|head)|time_step_|lru_width$|conv1d_width$|"
                           r"conv_L_cache$|state_size$)")
# Known non-attention model types, for configs that name no layer kinds or fields above (substring match).
_NON_ATTENTION_TYPES = ("mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba", "bamba", "falcon_h1", "lfm2",
                        "qwen3_next", "nemotron_h", "granitemoehybrid", "plamo2", "hymba", "kimi_linear", "hybrid")


def _non_attention_mixers(config) -> str | None:
    """What in ``config`` says some layer mixes the sequence other than by attention, or None."""
    for field in _LAYER_KIND_FIELDS:
        try:
            kinds = getattr(config, field, None)
        except Exception:  # a property that does not apply to this config
            continue
        if isinstance(kinds, (list, tuple)):
            other = sorted({str(k) for k in kinds} - _EXACT_LAYERS)
            if other:
                return f"config.{field} has {', '.join(other)} layers"
    pattern = getattr(config, "hybrid_override_pattern", None)  # Nemotron-H: M mamba, * attention, - MLP, E MoE
    if isinstance(pattern, str) and set(pattern) - set("*-E"):
        return f"config.hybrid_override_pattern {pattern!r} has mamba (M) layers"
    try:
        fields = sorted(k for k in config.to_dict() if _MIXER_FIELDS.match(k))
    except Exception:
        fields = []
    if fields:
        return f"config has recurrent/state-space/convolution fields ({', '.join(fields[:4])})"
    model_type = str(getattr(config, "model_type", ""))
    if any(t in model_type for t in _NON_ATTENTION_TYPES):
        return f"model type {model_type!r} is a recurrent/state-space/hybrid architecture"
    return None


def reject_non_attention_mixers(config) -> None:
    """Raise a ValueError, from the config alone, if the model mixes the sequence by anything but attention
    (recurrent, state-space, convolution or linear-attention layers): sequence parallelism splits the sequence
    and only attention exchanges what it needs across ranks."""
    configs = [config]
    try:
        text = config.get_text_config()
        configs += [text] if text is not config else []
    except Exception:  # no single text config
        pass
    for cfg in configs:
        why = _non_attention_mixers(cfg)
        if why is not None:
            raise ValueError(f"{getattr(config, 'model_type', type(config).__name__)}: some layers mix the sequence "
                             f"by something that is not attention these backends compute exactly ({why}). Split "
                             "across ranks, each such layer would see only its rank's shard of the sequence and "
                             "train silently wrong; train this model with the data_parallel backend (whole "
                             "sequences per process)")


def _check_fits(config, backend: Backend, head_split: int) -> None:
    """ValueError unless ``backend`` runs this model exactly with its q heads split ``head_split`` ways."""
    if not backend.sequence_parallel:
        return
    reject_non_attention_mixers(config)
    if not backend.splits_heads:
        return
    err = head_split_error(config.num_attention_heads, head_split, "Ulysses all-to-all", backend.name)
    if err is not None:
        raise err


def check_model_fits_plan(config, plan: ParallelPlan) -> None:
    """Raise a ValueError, before any weights load, if ``plan``'s backend cannot run this model sequence-parallel:
    sequence mixing other than attention, or q heads its all-to-all group (a USP group's Ulysses part, else the
    whole SP group) cannot split."""
    head_split = getattr(plan.attention_group, "ulysses_degree", plan.groups.sp_size)
    _check_fits(config, plan.backend, head_split)


def check_model_fits_backend(backend: str, config, *, sp_size: int, ulysses_degree: int | None = None) -> None:
    """``check_model_fits_plan`` before the groups exist: ``backend`` over ``sp_size`` ranks, USP's q heads split
    ``ulysses_degree`` ways (None: over the whole SP group, as ``parallel.groups.attention_group`` does)."""
    be = get_backend(backend)
    _check_fits(config, be, ulysses_degree or sp_size)
