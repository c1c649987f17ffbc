"""The model under evaluation: the flags both evals share, its dtype, loading it with the parallel plan's
attention, and one sequence sharded for that attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.layouts import num_chunks
from ..attention.registry import BACKENDS
from ..hf.attention import registered_backend
from ..hf.models import load_config, load_model
from ..hf.plan import apply_plan
from ..hf.self_check import self_check_config
from ..parallel.groups import group_layout, group_rank_size
from ..parallel.inputs import SeqParallelInputs, shard_batch, whole_batch
from ..parallel.plan import ParallelPlan, resolve_plan
from .lengths import int_at_least

Tensor = torch.Tensor
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def add_eval_model_args(parser) -> None:
    """The flags both evals share: sequence-parallel backend, dtype, RoPE overrides, position-limit escape."""
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="zigzag_ring",
                        help="sequence-parallel attention that splits each sequence over the launched processes")
    parser.add_argument("--ulysses-degree", type=int_at_least(1),
                        help="usp backend: Ulysses degree (default: all processes)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="model dtype; auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--rope-theta", type=float,
                        help="override the model's RoPE theta (turns the position-limit check off)")
    parser.add_argument("--rope-scaling", help="override the model's RoPE scaling, e.g. yarn:factor=8 (raises the "
                                               "position limit by the factor)")
    parser.add_argument("--allow-extrapolation", action="store_true",
                        help="allow lengths above the model's position limit (max_position_embeddings x RoPE "
                             "scaling factor), e.g. to show a model before extension beyond its training length")


def eval_dtype(name: str, device: torch.device) -> torch.dtype:
    """The model dtype for ``name``; "auto": bfloat16 on CUDA, float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_eval_model(name_or_path: str, device: torch.device, *, backend: str | None = "zigzag_ring",
                    dtype: torch.dtype = torch.float32, rope_theta: float | None = None,
                    rope_scaling: str | dict | None = None, ulysses_degree: int | None = None,
                    max_length: int | None = None, plan: ParallelPlan | None = None):
    """Collective: a causal LM in eval mode on ``device`` whose attention runs ``backend`` over all launched
    processes (None: the model's own attention, each process on whole sequences, for generation). A job that
    loads several models passes its ``plan`` (``resolve_plan``, collective) instead, so its groups are built once.

    Sequence-parallel, the plumbing is first proven exact on a 2-layer random probe of the same config
    (``self_check_config``) at positions reaching ``max_length`` (the sweep's largest length), before the weights
    load. Not on the trained model itself: in bf16, a trained model's sharpened attention drifts from sdpa's by
    more than the half-precision tolerance with nothing wrong (5e-2 relative on the 8-layer proof model, whose
    logits still agreed to 1.2e-2)."""
    plan = plan or resolve_plan(backend or "data_parallel", ulysses_degree=ulysses_degree)
    if not plan.backend.exact:
        raise ValueError(f"{plan.backend.name} is not exact attention (it is for training only): evaluate "
                         f"with one of {', '.join(sorted(BACKENDS))}")
    config = load_config(name_or_path, rope_theta=rope_theta, rope_scaling=rope_scaling)
    if plan.sequence_parallel:
        self_check_config(config, plan.backend, group=plan.attention_group, kernel=plan.kernel, device=device,
                          train_len=max_length)
    with device:  # transformers loads the weights straight onto the device
        model = load_model(name_or_path, dtype=dtype, config=config)
    model.to(device).eval()
    return apply_plan(model, plan)


def sp_shard(model, input_ids: Tensor, labels: Tensor | None = None, pad_id: int = 0) -> SeqParallelInputs:
    """This rank's shard of ONE sequence (input_ids [S], labels [S] HF-style or None) for the sequence-parallel
    attention registered in ``model`` (none: the whole sequence), padded at the END to the multiple the layout
    needs. Padding is causal-safe: no real position attends to it, and its labels are ignored."""
    device = next(model.parameters()).device
    ids = input_ids.long()[None].to(device)
    labels = None if labels is None else labels.long()[None].to(device)
    reg = registered_backend(model)
    if reg is None:  # the model's own attention: one contiguous piece
        return whole_batch(ids, labels)
    layout = group_layout(reg.backend.layout, reg.group)
    pad = -ids.shape[1] % num_chunks(layout, group_rank_size(reg.group)[1])
    ids = F.pad(ids, (0, pad), value=pad_id)
    labels = None if labels is None else F.pad(labels, (0, pad), value=-100)
    return shard_batch(layout, ids, labels, group=reg.group)
