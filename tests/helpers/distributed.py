"""Run a function on N processes joined in a process group (gloo on CPU, nccl on GPUs).

The processes fork from the tests' forkserver (``forkserver.py``), which has imported torch, transformers and the
package once; each process gets the caller's environment as it is at the call."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from easy_context.train.distributed import finish
from tests.helpers import forkserver  # noqa: F401  (sets the server's preload before it starts)


def _entry(rank: int, fn, world: int, init: str, backend: str, timeout_s: float, args: tuple,
           env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the server's environment is the one it started with, not the caller's now
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
        mp.start_processes(_entry, args=(fn, world, init, backend, timeout_s, args, dict(os.environ)),
                           nprocs=world, start_method="forkserver")
