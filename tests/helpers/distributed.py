"""Run a function on N spawned processes joined in a process group (gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from easy_context.train.distributed import finish


def _entry(rank: int, fn, world: int, init: str, backend: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    fn(rank, world, *args)
    finish()  # success: close the group and leave before gloo's destructors can abort the process


def run_distributed(fn, world: int, *args, backend: str = "gloo", timeout_s: float = 120) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; an exception in any of them fails the caller."""
    with tempfile.TemporaryDirectory() as d:
        init = "file://" + os.path.join(d, "store")
        mp.start_processes(_entry, args=(fn, world, init, backend, timeout_s, args), nprocs=world,
                           start_method="spawn")
