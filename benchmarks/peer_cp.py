"""PyTorch's own context parallel as a peer: the hf loop of peer_step.py with its one sequence split over P ranks by
``torch.distributed.tensor.experimental.context_parallel``.

Set up as PyTorch's and Hugging Face's documentation set it up: a 1-D DeviceMesh of the P ranks, the rotate method
from ``set_rotate_method`` ("allgather", PyTorch's default, or "alltoall"), the HF model with sdpa attention whose
attention masks are dropped for ``is_causal`` (what accelerate's context-parallel hooks do), the buffers
input_ids, shift_labels (labels shifted over the whole sequence, as the HF Trainer does) and position_ids sharded
by ``context_parallel`` in its load-balanced head-tail layout; each rank's loss is the mean over its tokens and
DistributedDataParallel averages the gradients over the ranks (so the loss is averaged over ranks).
The ring attention covers SDPA's flash, efficient and cuDNN kernels only: on CPU it cannot run (cp_unavailable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

BUFFERS = ("input_ids", "shift_labels", "position_ids")
ROTATE = ("allgather", "alltoall")
IGNORE = -100


def cp_api() -> tuple[Callable, Callable] | str:
    """(context_parallel, set_rotate_method) of the installed torch, or why it has none."""
    try:
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError as e:
        return f"torch {torch.__version__} has no context_parallel/set_rotate_method (torch >= 2.6 has): {e}"
    return context_parallel, set_rotate_method


def cp_unavailable(cuda: bool | None = None) -> str | None:
    """Why PyTorch's context parallel cannot run here (None: it can)."""
    api = cp_api()
    if isinstance(api, str):
        return api
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return "needs CUDA GPUs: PyTorch's context_parallel runs only SDPA's flash/efficient/cuDNN kernels"
    return None


def head_tail_order(seq: int, world: int) -> list[int]:
    """Token positions in the order of PyTorch's load-balanced layout: rank r holds chunks r and 2P-1-r of 2P
    (the _HeadTailLoadBalancer doc); concatenated over ranks."""
    if seq % (2 * world):
        raise ValueError(f"sequence length {seq} is not a multiple of 2 x {world} ranks: no load balancing")
    c = seq // (2 * world)
    return [i for r in range(world) for k in (r, 2 * world - 1 - r) for i in range(k * c, (k + 1) * c)]


def cp_buffers(ids: torch.Tensor) -> list[torch.Tensor]:
    """The full-sequence buffers of one step, in BUFFERS order: input_ids, labels shifted over the whole sequence
    (the last position ignored), position_ids."""
    shift = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=IGNORE)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    return [ids.clone(), shift, pos]


@contextlib.contextmanager
def cp_shards(mesh, ids: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Inside PyTorch's context_parallel over ``mesh``: this rank's shards of the step's buffers (by name)."""
    api = cp_api()
    if isinstance(api, str):
        raise RuntimeError(api)
    context_parallel, _ = api
    buffers = cp_buffers(ids)
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                          no_restore_buffers=set(buffers)):
        yield dict(zip(BUFFERS, buffers))


def drop_attention_masks(model: torch.nn.Module) -> None:
    """Every ``self_attn`` is called with no mask and ``is_causal=True``: context parallel supports no mask, and a
    mask built from a rank's shard (its positions are not contiguous) would be wrong anyway."""
    def hook(_module, args, kwargs):
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = None
            kwargs["is_causal"] = True
        return args, kwargs

    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def build_torch_cp(config, device: torch.device, rotate: str, lr: float, betas: tuple[float, float]):
    """The step function (full-sequence ids -> loss averaged over ranks) of the hf loop under PyTorch's context
    parallel over all ranks of the initialized process group."""
    from transformers import AutoModelForCausalLM

    why = cp_unavailable(device.type == "cuda")
    if why:
        raise SystemExit("torch_cp " + why)
    _, set_rotate_method = cp_api()
    set_rotate_method(rotate)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("cp",))
    with device:  # a random init on the GPU takes a moment, on the CPU most of a minute (8B)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    drop_attention_masks(model)
    model.train()
    ddp = DistributedDataParallel(model, device_ids=[device.index], broadcast_buffers=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=0.0, fused=True)

    def step(ids: torch.Tensor) -> float:
        if ids.shape[1] % (2 * world):
            raise SystemExit(f"torch_cp: sequence length {ids.shape[1]} is not a multiple of 2 x {world} ranks")
        with cp_shards(mesh, ids) as b:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = ddp(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["shift_labels"],
                           shift_labels=b["shift_labels"]).loss
            loss.backward()  # inside the context: the backward's SDPA runs the ring too
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        return loss.item() / world

    return step
