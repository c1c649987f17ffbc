"""DeepSpeed ZeRO-3 on CPU (gloo) inside a run_distributed worker, with every parameter partitioned."""

from __future__ import annotations

import os

import torch

# Persistence threshold 0: even the smallest parameter is an empty placeholder outside its module's calls.
CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def init(rank: int, world: int) -> None:
    """Let DeepSpeed adopt run_distributed's process group (CPU accelerator)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def loss_and_grads(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of a HF causal LM under ZeRO-3: (loss, every parameter's full gradient)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=CONFIG)
    loss = engine(input_ids=ids, labels=labels).loss
    engine.backward(loss)
    return loss.detach(), {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
