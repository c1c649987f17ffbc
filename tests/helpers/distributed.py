"""Run a function on N processes joined in a process group (gloo on CPU, nccl on GPUs).

The processes fork from a server that imported torch, transformers and the package once (multiprocessing's
forkserver), rather than each importing them again after a spawn: that import was most of a multi-process test's
time. The server never runs torch work, so forking it is safe; each process gets the caller's environment as it is
at the call."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from easy_context.train.distributed import finish


PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.mistral.modeling_mistral",
           "easy_context.hf.attention", "easy_context.hf.causal_lm", "easy_context.parallel.loss",
           "easy_context.train.loop", "tests.helpers.reference", "tests.helpers.tiny_models"]
mp.set_forkserver_preload(PRELOAD)


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
