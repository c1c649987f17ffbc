"""Hugging Face integration: run any easy_context backend inside a transformers decoder, by name.

``register_attention("zigzag_ring", group)`` registers the backend with transformers' AttentionInterface
as "easy_context_zigzag_ring", so every model that dispatches attention through the interface (Llama,
Mistral, Qwen2, Qwen3, ...) runs sequence-parallel with no change to its code. It also registers a mask
function for that name that returns None: no [S, S] mask is ever built, and transformers' packed-sequence
detection (which reads the non-contiguous zigzag position ids as packed documents) has no effect.
Each rank feeds its shard with its global position ids (``inputs.prepare_seq_parallel_inputs``).

What the backends cannot honour raises a ValueError instead of silently computing something else:
padding or custom attention masks, packed-document (varlen) kwargs, attention dropout, soft-capping,
attention sinks, a sliding window shorter than the sequence, and KV caches (generation).

Models whose sequence mixing is not (only) attention -- recurrent, state-space, convolutional or linear-attention
layers -- are refused from their config: split across ranks those layers would each see only their shard. RoPE
types whose frequencies follow the sequence length (dynamic NTK, LongRoPE) get the whole sequence's on every rank
(``rope.follow_sequence_length``).

``self_check(model)`` compares the patched model against full-sequence sdpa at startup, and ``causal_lm_loss``
against the model's own loss; EasyContext's patches once went silently local-only after a transformers upgrade.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..attention.comm import rank_and_size
from ..attention.layouts import check_length, num_chunks, shard
from ..attention.registry import BACKENDS, Backend, get_backend
from ..attention.reuse import attention_call_scope
from ..attention.ulysses import head_split_error
from ..parallel.groups import group_layout, group_rank_size, sp_process_group
from ..parallel.inputs import shift_labels
from ..parallel.loss import DEFAULT_CHUNK, SPLoss, chunked_cross_entropy, sequence_parallel_cross_entropy
from .rope import config_length_dependent, follow_sequence_length

Tensor = torch.Tensor
PREFIX = "easy_context_"
DATA_PARALLEL = "data_parallel"
_REFERENCE = PREFIX + "selfcheck_sdpa"
# Config attributes that rescale logits in a model's head; the chunked loss does not apply them.
_LOGIT_SCALES = ("logit_scale", "logits_scaling")
# Config attributes of a head that soft-caps its logits, cap * tanh(logits / cap) (Gemma 2/3, RecurrentGemma).
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")
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


@dataclass(frozen=True)
class Registration:
    """What a registered attention name runs: the backend, its SP group and kernel choice."""

    backend: Backend
    group: Any
    kernel: Any
    check: bool


_REGISTRY: dict[str, Registration] = {}
_recording: list[Tensor] | None = None  # self_check collects every attention output here


def implementation_name(backend: str) -> str:
    """The attn_implementation name of a backend; "flash" is spelled "fa" because transformers treats
    any name containing "flash" as a request for a flash-attention kernel."""
    return PREFIX + backend.replace("flash", "fa")


def registered_backend(model) -> Registration | None:
    """The registration behind ``model``'s current attention implementation, None if not ours."""
    return _REGISTRY.get(model.config._attn_implementation)


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


def _reject_non_attention_mixers(config) -> None:
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


def _group_max_position(config):
    """The largest position id over the SP group of the attention ``config`` currently runs (ours), from this
    rank's; unchanged when the attention is not sequence-parallel. Called in every forward: a collective."""
    def global_max(local: Tensor) -> Tensor:
        reg = _REGISTRY.get(config._attn_implementation)
        if reg is None:
            return local
        group = sp_process_group(reg.group)
        if rank_and_size(group)[1] == 1:
            return local
        top = local.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        return top

    return global_max


def _follow_sequence_length(model) -> None:
    kinds = config_length_dependent(model.config)
    if follow_sequence_length(model, _group_max_position(model.config)) == 0 and kinds:
        raise ValueError(f"RoPE {', '.join(kinds)} picks its frequencies from the sequence length, and "
                         f"{type(model).__name__}'s rotary embedding is not transformers' dynamic_rope_update, so "
                         "each rank would use its own shard's: use linear, yarn or llama3 scaling, or data_parallel")


def _reject_unsupported(name: str, query: Tensor, key: Tensor, attention_mask, dropout: float, world: int,
                        kwargs: dict) -> None:
    where = f"{name} (sequence-parallel attention)"
    if attention_mask is not None:
        raise ValueError(f"{where} got a {tuple(attention_mask.shape)} attention mask; it computes plain "
                         "causal attention over the whole sequence only: no padding or custom masks. Drop "
                         "the attention_mask and use full-length rows")
    if dropout:
        raise ValueError(f"{where}: attention dropout {dropout} is not supported; set config.attention_dropout = 0")
    for arg in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(arg) is not None:
            raise ValueError(f"{where}: the model passes {arg}, which these backends do not implement")
    if any(kwargs.get(a) is not None for a in ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens_q", "cu_seqlens_k")):
        raise ValueError(f"{where}: packed-document (varlen) batches are not supported; give one document per row")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{where}: query length {query.shape[2]} != key length {key.shape[2]}: KV caches "
                         "(generation) are not supported; call the model with use_cache=False")
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2] * world:
        raise ValueError(f"{where}: sliding window {window} is shorter than the sequence "
                         f"({query.shape[2]} x {world} ranks) and windows are not implemented; set "
                         "config.sliding_window = None (full attention) or train shorter sequences")


def _autocast_qkv(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under autocast HF's RoPE leaves q and k in float32 while v comes out of its linear in the autocast
    dtype; SDPA casts all three to that dtype, and so do we (outside autocast they are left as they are)."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _make_attention(name: str, reg: Registration):
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                  **kwargs) -> tuple[Tensor, None]:
        _, world = group_rank_size(reg.group)
        _reject_unsupported(name, query, key, attention_mask, dropout, world, kwargs)
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        query, key, value = _autocast_qkv(query, key, value)
        with attention_call_scope(module):
            out = reg.backend.attention(query, key, value, causal=causal, scale=scaling, group=reg.group,
                                        kernel=reg.kernel, check=reg.check).transpose(1, 2)
        if _recording is not None:
            _recording.append(out.detach())
        return out, None

    attention.__name__ = name
    return attention


def _make_mask(name: str, reg: Registration):
    def no_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None, local_size=None,
                **kwargs) -> None:
        # Called by transformers' create_*_mask: reject what we cannot honour, never build a mask.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(f"{name}: the attention_mask marks padding, which sequence-parallel attention "
                             "does not support; give full-length rows (pack or truncate) and drop the mask")
        _, world = group_rank_size(reg.group)
        if local_size is not None and local_size < q_length * world:
            raise ValueError(f"{name}: the model asks for a sliding/chunked window of {local_size} tokens, shorter "
                             f"than the sequence ({q_length} x {world} ranks); only full causal attention is "
                             "implemented: set config.sliding_window = None or train shorter sequences")
        return None

    return no_mask


def register_attention(backend: str | Backend, group=None, kernel=None, *, check: bool = True) -> str:
    """Register ``backend`` (a name in ``backends.BACKENDS`` or a Backend) for transformers; returns its name.

    ``group`` is the SP group (None: the world), ``kernel`` the local kernel (None: automatic); ``check``
    runs the backend's tiny cross-rank shape check on every call. Re-registering a name replaces it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    be = backend if isinstance(backend, Backend) else get_backend(backend)
    name = implementation_name(be.name)
    reg = Registration(be, group, kernel, check)
    _REGISTRY[name] = reg
    AttentionInterface.register(name, _make_attention(name, reg))
    AttentionMaskInterface.register(name, _make_mask(name, reg))
    return name


def register_all(group=None, kernel=None, *, check: bool = True) -> list[str]:
    """Register every backend in ``backends.BACKENDS`` with ``group``; returns their names."""
    return [register_attention(n, group, kernel, check=check) for n in BACKENDS]


def apply_seq_parallel_monkey_patch(method: str | Backend, model, group=None, kernel=None, *, check: bool = True):
    """Make ``model`` use sequence-parallel attention ``method`` (a backend name or Backend; EasyContext's
    "zigzag_ring_attn"-style names work too; "data_parallel": the model is left unchanged). Returns it.

    EasyContext's entry point, without patching any model code: it registers the backend with ``group``
    and ``kernel`` (see ``register_attention``) and sets the model's attention implementation; models with
    non-attention sequence mixers are refused, length-dependent RoPE made to follow the whole sequence.
    """
    if method == DATA_PARALLEL:
        return model
    _reject_non_attention_mixers(model.config)
    name = register_attention(method, group, kernel, check=check)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface, so {method!r} cannot be put into it (its attention is still "
                         f"{model.config._attn_implementation!r})")
    _follow_sequence_length(model)
    return model


@contextmanager
def _record():
    global _recording
    _recording = []
    try:
        yield _recording
    finally:
        _recording = None


def _register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_recorded(*args, **kwargs):
        out, weights = sdpa_attention_forward(*args, **kwargs)
        if _recording is not None:
            _recording.append(out.detach())
        return out, weights

    AttentionInterface.register(_REFERENCE, sdpa_recorded)
    AttentionMaskInterface.register(_REFERENCE, sdpa_mask)


def _rel_err(x: Tensor, ref: Tensor) -> float:
    x, ref = x.double(), ref.double()
    err = ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")  # NaN -> inf, so max() across ranks sees it


def _forward(model, ids: Tensor, pos: Tensor, **kwargs):
    """(attention outputs, rotary embeddings' outputs, model output) of one forward."""
    rotary: list[Tensor] = []

    def keep(module, args, out):  # cos, sin: [..., S, D]
        rotary.extend(t.detach() for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, Tensor))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if "RotaryEmbedding" in type(m).__name__]
    try:
        with _record() as outs:
            out = model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return outs, rotary, out


def _probe_positions(seq_len: int, train_len: int | None, layout: str, world: int) -> Tensor:
    """The self-check's position ids: 0..seq_len-1, or, when ``train_len`` is longer, each of the layout's chunks
    placed at the end of the same chunk of a ``train_len`` sequence, so that every rank's largest position and the
    largest over all ranks (which length-dependent RoPE reads) are those of training."""
    if not train_len or train_len <= seq_len:
        return torch.arange(seq_len)
    n = num_chunks(layout, world)
    ends = [(k + 1) * train_len // n for k in range(n)]
    return torch.cat([torch.arange(end - seq_len // n, end) for end in ends])


def _loss_mismatch(err: float, tol: float, what: str) -> RuntimeError:
    return RuntimeError(f"self_check: causal_lm_loss {what} the model's own loss (model(input_ids, labels=...)) "
                        f"by {err:.2e} relative (tolerance {tol:.0e}): the model changes its logits or adds a "
                        "loss term (a head scale or soft-cap, an auxiliary loss) that causal_lm_loss does not apply. "
                        "Do not train with it: compute the loss from the model's own outputs, or teach "
                        "causal_lm_loss that term")


def _default_tol(model) -> float:
    return 1e-4 if next(model.parameters()).dtype in (torch.float32, torch.float64) else 2e-2


def self_check(model, *, seq_len: int | None = None, batch: int = 1, tol: float | None = None,
               seed: int = 0, train_len: int | None = None) -> dict[str, float]:
    """Collective over the world: raise RuntimeError unless the patched model matches full-sequence sdpa.

    One no-grad forward of the same random batch: the patched model on this rank's shard, and the
    model switched to sdpa on the whole sequence. Every attention layer's output, the logits and
    ``causal_lm_loss`` (against the model's own ``labels=`` loss) must agree within ``tol`` (relative;
    default 1e-4 in float32/64, 2e-2 in half precision) on every rank, and the patched attention must run
    in every layer. ``train_len``: the training length; the probe's positions then reach it as training's
    do on every rank (``_probe_positions``), so RoPE that depends on the length is checked in its regime.
    The rotary embeddings' cos/sin are compared too: a random model's near-uniform attention hides wrong
    frequencies from the outputs. Returns the worst errors over all ranks.
    """
    reg = registered_backend(model)
    if reg is None:
        raise ValueError(f"self_check: the model's attention is {model.config._attn_implementation!r}, not an "
                         "easy_context backend; call apply_seq_parallel_monkey_patch first")
    name = model.config._attn_implementation
    rank, world = group_rank_size(reg.group)
    layout = group_layout(reg.backend.layout, reg.group)
    seq_len = seq_len or 32 * world
    check_length(seq_len, layout, world)
    param = next(model.parameters())
    tol = _default_tol(model) if tol is None else tol
    gen = torch.Generator().manual_seed(seed)  # the same batch on every rank, no communication
    ids = torch.randint(model.config.vocab_size, (batch, seq_len), generator=gen).to(param.device)
    pos = _probe_positions(seq_len, train_len, layout, world).to(param.device).expand(batch, seq_len)
    _register_reference()
    training = model.training
    model.eval()
    local = [shard(t, layout, rank, world) for t in (ids, pos)]
    try:
        with torch.no_grad():
            ours, rotary, logits = _forward(model, *local)
            logits = logits.logits
            loss = causal_lm_loss(model, local[0], shard(shift_labels(ids), layout, rank, world), local[1]).value
            model.set_attn_implementation(_REFERENCE)
            try:  # an all-ones mask: position jumps (train_len) are not read as packed documents
                ref, ref_rotary, ref_out = _forward(model, ids, pos, labels=ids, attention_mask=torch.ones_like(ids))
            finally:
                model.set_attn_implementation(name)
    finally:
        model.train(training)
    missing = float(len(ours) != len(ref) or not ours)
    attn = max((_rel_err(o, shard(r, layout, rank, world)) for o, r in zip(ours, ref)), default=float("inf"))
    rope = max((_rel_err(o, shard(r, layout, rank, world, dim=-2)) for o, r in zip(rotary, ref_rotary)), default=0.0)
    rope = rope if len(rotary) == len(ref_rotary) else float("inf")
    errs = torch.tensor([attn, rope, _rel_err(logits, shard(ref_out.logits, layout, rank, world)),
                         _rel_err(loss, ref_out.loss), missing], dtype=torch.float64, device=param.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    attn, rope, logit_err, loss_err, missing = errs.tolist()
    if missing:
        raise RuntimeError(f"self_check: {name} ran in {len(ours)} attention calls where sdpa ran in {len(ref)} "
                           f"(rank {rank}): transformers did not route every attention layer through it, so "
                           "training would not be sequence-parallel. Check the transformers version / model class")
    if attn > tol or logit_err > tol or rope > tol:
        raise RuntimeError(f"self_check: {name} differs from full-sequence sdpa on the same input (worst over "
                           f"ranks: attention output {attn:.2e}, rotary cos/sin {rope:.2e}, logits {logit_err:.2e} "
                           f"relative; tolerance {tol:.0e}). Do not train: the patched attention is not exact (wrong "
                           "group, layout or position ids, RoPE frequencies that follow each rank's shard, or "
                           "a transformers change in how attention is called)")
    if loss_err > tol:
        raise _loss_mismatch(loss_err, tol, f"under {name} differs from full-sequence sdpa with")
    return {"attention": attn, "rotary": rope, "logits": logit_err, "loss": loss_err}


def _check_own_loss(model, *, seq_len: int = 64, batch: int = 1, tol: float | None = None,
                    seed: int = 0) -> dict[str, float]:
    """One process, no collective: raise RuntimeError unless ``causal_lm_loss`` of the (unpatched) model equals
    its own ``model(input_ids, labels=...)`` loss on a random batch (no-grad). Returns the relative error."""
    param = next(model.parameters())
    tol = _default_tol(model) if tol is None else tol
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (batch, seq_len), generator=gen).to(param.device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = causal_lm_loss(model, ids, shift_labels(ids)).value
            ref = model(input_ids=ids, labels=ids, use_cache=False).loss
    finally:
        model.train(training)
    err = _rel_err(ours, ref)
    if err > tol:
        raise _loss_mismatch(err, tol, "differs from")
    return {"loss": err}


def _head_softcap(config) -> float | None:
    for attr in _LOGIT_SCALES:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"causal_lm_loss: config.{attr} = {getattr(config, attr)} rescales this model's "
                             "logits and the chunked loss does not apply it; compute the loss from the model's "
                             "logits instead")
    return next((getattr(config, a) for a in _SOFTCAPS if getattr(config, a, None) is not None), None)


def _moe_aux_spec(model) -> tuple[int, int, float] | None:
    """(experts, experts per token, coefficient) when ``model``'s own loss adds its router's load-balancing loss
    (``config.output_router_logits``, Mixtral / Qwen-MoE style), else None."""
    if not getattr(model.config, "output_router_logits", False):
        return None
    spec = tuple(getattr(model, a, None) for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef"))
    if None in spec:
        raise ValueError(f"causal_lm_loss: {type(model).__name__} has config.output_router_logits = True but no "
                         "num_experts / num_experts_per_tok / router_aux_loss_coef of a Mixtral-style router "
                         "loss, so its auxiliary loss cannot be reproduced; set config.output_router_logits = False "
                         "(no router loss) or compute the loss from the model's own outputs")
    return spec


def _router_aux_share(router_logits, experts: int, top_k: int, group, world: int) -> tuple[Tensor, Tensor]:
    """This rank's share of HF's ``load_balancing_loss_func`` (no mask) over every token of the SP group, and the
    group's value: experts x sum_e f_e P_e, f_e = the fraction of top-k picks of expert e, P_e = its mean router
    probability, both over all tokens of all MoE layers. f is a count (no gradient): all-reduced, it makes the
    shares of P, each rank's own tokens' sum / the group's token count, add up to the exact loss."""
    if not router_logits:
        raise ValueError("causal_lm_loss: the model returned no router logits although config.output_router_logits "
                         "is set; set config.output_router_logits = False or compute the loss from its own outputs")
    device = router_logits[0].device
    counts = torch.zeros(experts + 1, dtype=torch.float64, device=device)  # picks per expert, then rows
    probs = torch.zeros(experts, dtype=torch.float32, device=device)
    for logits in router_logits:
        weights = torch.softmax(logits, dim=-1)  # in the logits' dtype, as HF does
        picks = torch.topk(weights, top_k, dim=-1).indices.reshape(-1)
        counts[:experts] += torch.bincount(picks, minlength=experts).to(counts.dtype)
        counts[experts] += weights.shape[0]
        probs = probs + weights.float().sum(0)
    if world > 1:
        dist.all_reduce(counts, group=group)
    rows = counts[experts].float()
    share = experts * ((counts[:experts].float() / rows) * (probs / rows)).sum()
    value = share.detach().clone()
    if world > 1:
        dist.all_reduce(value, group=group)
    return share, value


def causal_lm_loss(model, input_ids: Tensor, target_ids: Tensor, position_ids: Tensor | None = None, *,
                   group: dist.ProcessGroup | None = None, grad_reduction: str = "mean",
                   chunk_size: int = DEFAULT_CHUNK, ignore_index: int = -100, **model_kwargs) -> SPLoss:
    """This rank's loss for a causal LM: decoder body on the shard, then the chunked exact SP cross entropy.

    The full-vocabulary logits are never built: the loss comes from the last hidden state and the
    output embedding (tied or not; a head soft-cap applied), plus the router's load-balancing loss where
    the model's own loss adds it (``output_router_logits``; exact over the SP group). ``target_ids`` are the shifted
    targets from ``prepare_seq_parallel_inputs``. ``group``: the ProcessGroup over which the loss is a
    token mean; default the group the model's attention was registered with. For an unpatched
    (data-parallel) model the loss is this rank's own token mean. See ``loss.py`` for ``grad_reduction``.
    """
    head = model.get_output_embeddings()
    if head is None or model.base_model is model or not isinstance(head, torch.nn.Linear):
        raise ValueError(f"causal_lm_loss needs a causal-LM model with a linear output head (e.g. "
                         f"LlamaForCausalLM); got {type(model).__name__}")
    if head.weight.numel() == 0:
        raise ValueError("causal_lm_loss: the output head's weight is empty here (partitioned by DeepSpeed ZeRO-3?); "
                         "gather it (deepspeed.zero.GatheredParameters) or use ZeRO stage <= 2")
    softcap = _head_softcap(model.config)
    aux = _moe_aux_spec(model)
    if aux is not None:
        if model_kwargs.get("attention_mask") is not None:
            raise ValueError("causal_lm_loss: a padding attention_mask with the router's load-balancing loss "
                             "(config.output_router_logits) is not implemented; give full-length rows, no mask")
        model_kwargs = {**model_kwargs, "output_router_logits": True}
    reg = registered_backend(model)
    if reg is not None:
        _follow_sequence_length(model)  # also when attention was set by hand (apply_s2attn)
        if group is None:
            group = sp_process_group(reg.group)
    out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state
    args = dict(bias=head.bias, chunk_size=chunk_size, ignore_index=ignore_index, softcap=softcap)
    if reg is None:
        loss = chunked_cross_entropy(hidden, head.weight, target_ids, reduction="mean", **args)
        result = SPLoss(loss, loss.detach(), int((target_ids != ignore_index).sum()))
    else:
        result = sequence_parallel_cross_entropy(hidden, head.weight, target_ids, group=group,
                                                 grad_reduction=grad_reduction, **args)
    if aux is None:
        return result
    experts, top_k, coef = aux
    world = 1 if reg is None else rank_and_size(group)[1]
    share, value = _router_aux_share(getattr(out, "router_logits", None), experts, top_k, group, world)
    scale = world if grad_reduction == "mean" else 1  # the same convention as the cross entropy's share
    return SPLoss(result.loss + coef * scale * share, result.value + coef * value, result.num_tokens)


class CausalLMWithLoss(torch.nn.Module):
    """A HF causal LM whose forward(input_ids, target_ids, position_ids) returns this rank's
    (loss, group-mean loss value, group valid-token count) from ``causal_lm_loss``: the module to hand to
    accelerate / DeepSpeed, so the chunked loss runs inside the engine's forward.

    Under DeepSpeed ZeRO-3 the output weight is used outside its own module's forward, so it is registered
    as this module's external parameter (DeepSpeed then gathers it for the loss in forward and backward).
    """

    def __init__(self, model, *, group=None, grad_reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.config = model.config  # accelerate sizes DeepSpeed's "auto" buckets from config.hidden_size
        self.group, self.grad_reduction, self.chunk_size = group, grad_reduction, chunk_size
        head = model.get_output_embeddings()
        try:
            from deepspeed.zero import register_external_parameter
        except ImportError:
            return
        if isinstance(head, torch.nn.Linear):
            register_external_parameter(self, head.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, position_ids: Tensor | None = None):
        out = causal_lm_loss(self.model, input_ids, target_ids, position_ids, group=self.group,
                             grad_reduction=self.grad_reduction, chunk_size=self.chunk_size)
        return out.loss, out.value, torch.tensor(out.num_tokens, device=out.loss.device)


def check_model_fits_backend(backend: str, config, *, sp_size: int, ulysses_degree: int | None = None) -> None:
    """Raise a ValueError, before any weights load, if ``backend`` cannot run this model sequence-parallel: sequence
    mixing other than attention (recurrent, state-space, convolution, linear attention), or q heads that Ulysses
    (and USP's Ulysses part) cannot split over its degree."""

    if backend == DATA_PARALLEL:
        return
    _reject_non_attention_mixers(config)
    degree = {"ulysses": sp_size, "usp": ulysses_degree or 1}.get(get_backend(backend).name, 1)
    heads = config.num_attention_heads
    err = head_split_error(heads, degree, "Ulysses all-to-all", backend)
    if err is not None:
        raise err


def self_check_config(config, method: str, *, group=None, kernel=None, device=None, layers: int = 2,
                      seq_len: int | None = None, train_len: int | None = None) -> dict[str, float]:
    """``self_check`` on a ``layers``-layer random model of ``config`` (bf16 on CUDA, float32 on CPU): proves
    the attention plumbing (routing, group, layout, positions at the training length ``train_len``) and the
    loss wrapper exact before the real weights are loaded. ``method`` "data_parallel": the loss wrapper only
    (``causal_lm_loss`` against the model's own loss, one process, no collective)."""
    import copy

    from transformers import AutoModelForCausalLM

    if method != DATA_PARALLEL:
        _reject_non_attention_mixers(config)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = min(layers, cfg.num_hidden_layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        try:
            cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
        except AttributeError:  # derived from other fields (RecurrentGemma's block_types), not settable
            pass
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]):  # same probe on every rank; the caller's random stream untouched
        torch.manual_seed(0)
        probe = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(device)
    if method == DATA_PARALLEL:
        result = _check_own_loss(probe, seq_len=seq_len or 64)
    else:
        apply_seq_parallel_monkey_patch(method, probe, group=group, kernel=kernel)
        result = self_check(probe, seq_len=seq_len, train_len=train_len)
    del probe
    return result


def num_parameters(model) -> int:
    """Parameter count, also when DeepSpeed ZeRO-3 has partitioned the parameters (their full ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
