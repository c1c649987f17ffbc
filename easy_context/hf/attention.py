"""Run any easy_context backend inside a transformers decoder: register it with transformers' AttentionInterface
and put it into a model.

``register_attention("zigzag_ring", group)`` registers the backend as "easy_context_zigzag_ring", so every model
that dispatches attention through the interface (Llama, Mistral, Qwen2, Qwen3, ...) runs sequence-parallel with no
change to its code. It also registers a mask function for that name that returns None: no [S, S] mask is ever
built, and transformers' packed-sequence detection (which reads the non-contiguous zigzag position ids as packed
documents) has no effect. Each rank feeds its shard with its global position ids
(``parallel.inputs.prepare_seq_parallel_inputs``). ``use_sequence_parallel_attention(method, model)`` registers
and sets it (EasyContext's ``apply_seq_parallel_monkey_patch``, which patches nothing).

Packed documents: position ids that restart (``parallel.inputs``) keep each token inside its document. The
attention learns the documents of a forward from the position ids the model hands it (every decoder layer
passes them on): ``causal_lm_loss`` binds the batch's ``Documents`` to that tensor (``bind_documents``), and
otherwise the first layer reads them from every rank's positions (one small all-gather per forward). Keyed by
the tensor, not by a context, they also reach the layer's activation-checkpoint recompute in backward.

What the backends cannot honour raises a ValueError instead of silently computing something else:
padding or custom attention masks, flash-attention varlen kwargs (cu_seq_lens_*: give restarting position ids
instead), attention dropout, soft-capping, attention sinks, a sliding window shorter than the sequence, and KV
caches (generation). Models the backends
cannot run at all are refused from their config (``compatibility``). RoPE types whose frequencies follow the
sequence length (dynamic NTK, LongRoPE) get the whole sequence's on every rank (``rope.follow_sequence_length``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from ..attention.comm import rank_and_size
from ..attention.documents import Documents, gather_documents
from ..attention.precision import autocast_dtype
from ..attention.registry import BACKENDS, Backend, get_backend
from ..attention.reuse import attention_call_scope
from ..parallel.groups import group_layout, group_rank_size, sp_process_group
from .compatibility import reject_non_attention_mixers
from .rope import config_length_dependent, follow_sequence_length

Tensor = torch.Tensor
PREFIX = "easy_context_"


@dataclass(frozen=True)
class Registration:
    """What a registered attention name runs: the backend, its SP group and kernel choice."""

    backend: Backend
    group: Any
    kernel: Any
    check: bool


_REGISTRY: dict[str, Registration] = {}
_output_hooks: list[Callable[[Tensor], None]] = []  # see attention_output_hook
# this rank's position ids tensor of a forward -> ((layout, SP group), the whole batch's Documents or None)
_documents: WeakIdKeyDictionary = WeakIdKeyDictionary()


def implementation_name(backend: str) -> str:
    """The attn_implementation name of a backend; "flash" is spelled "fa" because transformers treats
    any name containing "flash" as a request for a flash-attention kernel."""
    return PREFIX + backend.replace("flash", "fa")


def registered_backend(model) -> Registration | None:
    """The registration behind ``model``'s current attention implementation, None if not ours."""
    return _REGISTRY.get(model.config._attn_implementation)


@contextmanager
def attention_output_hook(hook: Callable[[Tensor], None]) -> Iterator[None]:
    """Inside the block, ``hook`` gets every attention output [B, S, H, D] (detached) of a registered backend, and
    whatever else is handed to ``observe_attention_output`` (the self-check's sdpa reference)."""
    _output_hooks.append(hook)
    try:
        yield
    finally:
        _output_hooks.remove(hook)


def observe_attention_output(out: Tensor) -> None:
    """Hand an attention output to every active ``attention_output_hook``."""
    for hook in _output_hooks:
        hook(out.detach())


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


def follow_sequence_length_over_group(model) -> None:
    """Make ``model``'s length-dependent RoPE pick its frequencies from the whole sequence over the SP group of
    its registered attention; ValueError if a rotary embedding cannot be made to (not transformers' own)."""
    kinds = config_length_dependent(model.config)
    if follow_sequence_length(model, _group_max_position(model.config)) == 0 and kinds:
        raise ValueError(f"RoPE {', '.join(kinds)} picks its frequencies from the sequence length, and "
                         f"{type(model).__name__}'s rotary embedding is not transformers' dynamic_rope_update, so "
                         "each rank would use its own shard's: use linear, yarn or llama3 scaling, or data_parallel")


def _documents_key(reg: Registration) -> tuple[str, int]:
    return group_layout(reg.backend.layout, reg.group), id(sp_process_group(reg.group))


def bind_documents(position_ids: Tensor, documents: Documents | None, reg: Registration) -> None:
    """Tell ``reg``'s attention that a forward with this rank's ``position_ids`` (the very tensor the model gets)
    holds ``documents`` (of the whole batch; None: one per row), so it need not read them from every rank."""
    _documents[position_ids] = (_documents_key(reg), documents)


def documents_of(position_ids: Tensor | None, reg: Registration) -> Documents | None:
    """The packed documents of the forward that this rank's ``position_ids`` belong to: bound by
    ``bind_documents``, else read from every rank's positions (collective over the SP group on a tensor's first
    use) and remembered for the tensor's lifetime (the other layers, the checkpoint recompute)."""
    if position_ids is None:
        return None
    key = _documents_key(reg)
    known = _documents.get(position_ids)
    if known is not None and known[0] == key:
        return known[1]
    group = sp_process_group(reg.group)
    if rank_and_size(group)[1] == 1:
        docs = Documents.from_position_ids(position_ids)
    else:
        docs = gather_documents(position_ids, key[0], group)
    _documents[position_ids] = (key, docs)
    return docs


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
        raise ValueError(f"{where}: flash-attention varlen kwargs (cu_seq_lens_*) are not read; give packed "
                         "documents as position ids that restart at 0 with each document (prepare_seq_parallel_inputs "
                         "shards them, with cu_seqlens= if you have lengths)")
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
    dtype = autocast_dtype(query.device.type)
    if dtype is None:
        return query, key, value
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _make_attention(name: str, reg: Registration):
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                  **kwargs) -> tuple[Tensor, None]:
        _, world = group_rank_size(reg.group)
        _reject_unsupported(name, query, key, attention_mask, dropout, world, kwargs)
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        query, key, value = _autocast_qkv(query, key, value)
        docs = documents_of(kwargs.get("position_ids"), reg)
        extra = {} if docs is None else {"documents": docs}  # backends without documents never see the argument
        with attention_call_scope(module):
            out = reg.backend.attention(query, key, value, causal=causal, scale=scaling, group=reg.group,
                                        kernel=reg.kernel, check=reg.check, **extra).transpose(1, 2)
        observe_attention_output(out)
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
    """Register ``backend`` (a registry name or a Backend) for transformers; returns its name.

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
    """Register every sequence-parallel backend (``registry.BACKENDS``) with ``group``; returns their names."""
    return [register_attention(n, group, kernel, check=check) for n in BACKENDS]


def set_attention_implementation(model, name: str, what: str) -> None:
    """Set ``model``'s attention implementation to the registered ``name`` (``what`` it runs, for the error);
    ValueError if it did not take: the model does not dispatch attention through the AttentionInterface."""
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         f"AttentionInterface, so {what} cannot be put into it (its attention is still "
                         f"{model.config._attn_implementation!r})")


def use_sequence_parallel_attention(method: str | Backend, model, group=None, kernel=None, *, check: bool = True):
    """Make ``model`` use sequence-parallel attention ``method`` (a backend name or Backend; EasyContext's
    "zigzag_ring_attn"-style names work too; "data_parallel": the model is left unchanged). Returns it.

    No model code is patched: the backend is registered with ``group`` and ``kernel`` (see ``register_attention``)
    and set as the model's attention implementation; models with non-attention sequence mixers are refused,
    length-dependent RoPE made to follow the whole sequence.
    """
    backend = method if isinstance(method, Backend) else get_backend(method)
    if not backend.sequence_parallel:
        return model
    reject_non_attention_mixers(model.config)
    name = register_attention(backend, group, kernel, check=check)
    set_attention_implementation(model, name, repr(backend.name))
    follow_sequence_length_over_group(model)
    return model


# EasyContext's name for it, kept for code written against EasyContext.
apply_seq_parallel_monkey_patch = use_sequence_parallel_attention
