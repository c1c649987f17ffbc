"""The startup self-check: a model with easy_context attention against itself on full-sequence sdpa.

EasyContext's patches once went silently local-only after a transformers upgrade. ``self_check(model)`` runs
one random batch through the model on this rank's shard and through the same model switched to transformers'
sdpa on the whole sequence, and compares every attention layer's output, the rotary cos/sin, the logits and
``causal_lm_loss`` (against the model's own loss) on every rank. With ``packed=True`` a second batch of packed
documents (restarting position ids) is compared with sdpa's own packed-sequence mask, proving that the documents
reach every layer. ``self_check_config`` does it on a small random model of a config, before the real weights load.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from ..attention.documents import Documents
from ..attention.layouts import check_length, num_chunks, shard
from ..attention.registry import Backend, get_backend
from ..parallel.groups import group_layout, group_rank_size
from ..parallel.inputs import shift_labels
from .attention import (PREFIX, attention_output_hook, observe_attention_output, registered_backend,
                        use_sequence_parallel_attention)
from .causal_lm import causal_lm_loss
from .compatibility import reject_non_attention_mixers

Tensor = torch.Tensor
_REFERENCE = PREFIX + "selfcheck_sdpa"


def _register_reference() -> None:
    """Register transformers' sdpa (and its mask) as the reference name, its outputs observed as ours are."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_recorded(*args, **kwargs):
        out, weights = sdpa_attention_forward(*args, **kwargs)
        observe_attention_output(out)
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
    outs: list[Tensor] = []
    try:
        with attention_output_hook(outs.append):
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


def _packed_errors(model, name: str, ids: Tensor, layout: str, rank: int, world: int) -> tuple[float, float]:
    """(attention, logits) relative errors of ``model`` on this rank's shard of ``ids`` packed as four documents
    (one crossing the shards) against sdpa on the whole sequence, which reads restarting positions as documents.
    The model runs in eval mode under no_grad; ``name`` is its registered attention."""
    s = ids.shape[1]
    docs = Documents(((0, 1, 1 + s // 4, 1 + s // 4 + s // 2, s),))
    pos = docs.position_ids(ids.device).expand_as(ids)
    ours, _, out = _forward(model, shard(ids, layout, rank, world), shard(pos, layout, rank, world))
    model.set_attn_implementation(_REFERENCE)
    try:  # no attention_mask: transformers builds its packed-sequence mask from the restarting positions
        ref, _, ref_out = _forward(model, ids, pos)
    finally:
        model.set_attn_implementation(name)
    attn = max((_rel_err(o, shard(r, layout, rank, world)) for o, r in zip(ours, ref)), default=float("inf"))
    attn = attn if len(ours) == len(ref) else float("inf")
    return attn, _rel_err(out.logits, shard(ref_out.logits, layout, rank, world))


def self_check(model, *, seq_len: int | None = None, batch: int = 1, tol: float | None = None,
               seed: int = 0, train_len: int | None = None, packed: bool = False) -> dict[str, float]:
    """Collective over the world: raise RuntimeError unless the patched model matches full-sequence sdpa.

    One no-grad forward of the same random batch: the patched model on this rank's shard, and the
    model switched to sdpa on the whole sequence. Every attention layer's output, the logits and
    ``causal_lm_loss`` (against the model's own ``labels=`` loss) must agree within ``tol`` (relative;
    default 1e-4 in float32/64, 2e-2 in half precision) on every rank, and the patched attention must run
    in every layer. ``train_len``: the training length; the probe's positions then reach it as training's
    do on every rank (``_probe_positions``), so RoPE that depends on the length is checked in its regime.
    The rotary embeddings' cos/sin are compared too: a random model's near-uniform attention hides wrong
    frequencies from the outputs. ``packed``: also a batch of packed documents (module doc; "packed" in the
    result). Returns the worst errors over all ranks.
    """
    reg = registered_backend(model)
    if reg is None:
        raise ValueError(f"self_check: the model's attention is {model.config._attn_implementation!r}, not an "
                         "easy_context backend; call use_sequence_parallel_attention first")
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
            packed_errs = _packed_errors(model, name, ids, layout, rank, world) if packed else (0.0, 0.0)
    finally:
        model.train(training)
    missing = float(len(ours) != len(ref) or not ours)
    attn = max((_rel_err(o, shard(r, layout, rank, world)) for o, r in zip(ours, ref)), default=float("inf"))
    rope = max((_rel_err(o, shard(r, layout, rank, world, dim=-2)) for o, r in zip(rotary, ref_rotary)), default=0.0)
    rope = rope if len(rotary) == len(ref_rotary) else float("inf")
    errs = torch.tensor([attn, rope, _rel_err(logits, shard(ref_out.logits, layout, rank, world)),
                         _rel_err(loss, ref_out.loss), missing, max(packed_errs)], dtype=torch.float64,
                        device=param.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    attn, rope, logit_err, loss_err, missing, packed_err = errs.tolist()
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
    if packed_err > tol:
        raise RuntimeError(f"self_check: on packed documents (restarting position ids) {name} differs from "
                           f"full-sequence sdpa with its packed-sequence mask by {packed_err:.2e} relative (attention "
                           f"outputs and logits, tolerance {tol:.0e}): the documents do not reach this model's "
                           "attention (its layers must pass position_ids on to the attention function). Do not train "
                           "packed batches with it: give one document per row")
    result = {"attention": attn, "rotary": rope, "logits": logit_err, "loss": loss_err}
    return {**result, "packed": packed_err} if packed else result


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


def self_check_config(config, method: str | Backend, *, group=None, kernel=None, device=None, layers: int = 2,
                      seq_len: int | None = None, train_len: int | None = None,
                      packed: bool = False) -> dict[str, float]:
    """``self_check`` on a ``layers``-layer random model of ``config`` (bf16 on CUDA, float32 on CPU): proves
    the attention plumbing (routing, group, layout, positions at the training length ``train_len``) and the
    loss wrapper exact before the real weights are loaded. ``method``: a Backend or its name; one that does not
    split the sequence ("data_parallel") checks the loss wrapper only (``causal_lm_loss`` against the model's
    own loss, one process, no collective). ``packed``: also check packed documents (``self_check``)."""
    from transformers import AutoModelForCausalLM

    backend = method if isinstance(method, Backend) else get_backend(method)
    if backend.sequence_parallel:
        reject_non_attention_mixers(config)
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = min(layers, cfg.num_hidden_layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        try:
            cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
        except AttributeError:  # derived from other fields (RecurrentGemma's block_types), not settable
            pass
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # same probe on every rank; the caller's random streams untouched; built where it runs (a 7B shape's probe
    # took 16 s to initialise on a CPU)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        probe = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if backend.sequence_parallel:
        use_sequence_parallel_attention(backend, probe, group=group, kernel=kernel)
        result = self_check(probe, seq_len=seq_len, train_len=train_len, packed=packed)
    else:
        result = _check_own_loss(probe, seq_len=seq_len or 64)
    del probe
    return result

