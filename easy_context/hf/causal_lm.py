"""The loss of a Hugging Face causal LM under sequence parallelism, without full-vocabulary logits.

``causal_lm_loss`` runs the decoder body on this rank's shard and the chunked exact cross entropy of
``parallel.loss`` on its last hidden state and output embedding, applying what the model's own loss applies: a
head soft-cap of the logits and the MoE router's load-balancing loss (exact over the SP group); a logit scale it
does not apply is refused. ``CausalLMWithLoss`` is the module to hand to accelerate / DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..attention.comm import rank_and_size
from ..attention.documents import Documents
from ..parallel.groups import sp_process_group
from ..parallel.loss import DEFAULT_CHUNK, SPLoss, chunked_cross_entropy, sequence_parallel_cross_entropy
from .attention import bind_documents, follow_sequence_length_over_group, registered_backend

Tensor = torch.Tensor
# Config attributes that rescale logits in a model's head; the chunked loss does not apply them.
_LOGIT_SCALES = ("logit_scale", "logits_scaling")
# Config attributes of a head that soft-caps its logits, cap * tanh(logits / cap) (Gemma 2/3, RecurrentGemma).
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


def _head_softcap(config) -> float | None:
    """The soft-cap of ``config``'s head logits (None: none); ValueError for a logit scale it cannot apply."""
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
                   chunk_size: int = DEFAULT_CHUNK, ignore_index: int = -100, documents: Documents | None = None,
                   fused_loss: bool = False, **model_kwargs) -> SPLoss:
    """This rank's loss for a causal LM: decoder body on the shard, then the chunked exact SP cross entropy.

    The full-vocabulary logits are never built: the loss comes from the last hidden state and the
    output embedding (tied or not; a head soft-cap applied), plus the router's load-balancing loss where
    the model's own loss adds it (``output_router_logits``; exact over the SP group). ``target_ids`` are the shifted
    targets from ``prepare_seq_parallel_inputs``. ``group``: the ProcessGroup over which the loss is a
    token mean; default the group the model's attention was registered with. For an unpatched
    (data-parallel) model the loss is this rank's own token mean. See ``parallel.loss`` for ``grad_reduction``.
    ``documents``: the batch's packed documents (``SeqParallelInputs.documents``), handed to the attention of this
    forward; without them it reads them from the restarting ``position_ids`` itself (one small collective).
    ``fused_loss``: the loss's softmax in torch.compile'd kernels (``chunked_cross_entropy``'s ``fused``).
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
    if documents is not None and position_ids is None:
        raise ValueError("causal_lm_loss: documents need this rank's position_ids (restarting with each document, "
                         "as prepare_seq_parallel_inputs gives them)")
    reg = registered_backend(model)
    if reg is not None:
        follow_sequence_length_over_group(model)  # also when attention was set by hand (apply_s2attn)
        if group is None:
            group = sp_process_group(reg.group)
        if documents is not None:
            bind_documents(position_ids, documents, reg)
    out = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state
    args = dict(bias=head.bias, chunk_size=chunk_size, ignore_index=ignore_index, softcap=softcap, fused=fused_loss)
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
    """A HF causal LM whose forward(input_ids, target_ids, position_ids, documents=None) returns this rank's
    (loss, group-mean loss value, group valid-token count) from ``causal_lm_loss``: the module to hand to
    accelerate / DeepSpeed, so the chunked loss runs inside the engine's forward.

    Under DeepSpeed ZeRO-3 the output weight is used outside its own module's forward, so it is registered
    as this module's external parameter (DeepSpeed then gathers it for the loss in forward and backward).
    """

    def __init__(self, model, *, group=None, grad_reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK,
                 fused_loss: bool = False):
        super().__init__()
        self.model = model
        self.config = model.config  # accelerate sizes DeepSpeed's "auto" buckets from config.hidden_size
        self.group, self.grad_reduction, self.chunk_size = group, grad_reduction, chunk_size
        self.fused_loss = fused_loss
        head = model.get_output_embeddings()
        try:
            from deepspeed.zero import register_external_parameter
        except ImportError:
            return
        if isinstance(head, torch.nn.Linear):
            register_external_parameter(self, head.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor, position_ids: Tensor | None = None,
                documents: Documents | None = None):
        out = causal_lm_loss(self.model, input_ids, target_ids, position_ids, group=self.group,
                             grad_reduction=self.grad_reduction, chunk_size=self.chunk_size, documents=documents,
                             fused_loss=self.fused_loss)
        return out.loss, out.value, torch.tensor(out.num_tokens, device=out.loss.device)


def num_parameters(model) -> int:
    """Parameter count, also when DeepSpeed ZeRO-3 has partitioned the parameters (their full ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
