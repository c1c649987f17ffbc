"""A training or eval script's process group: join the one a launcher (accelerate launch, torchrun) set up
(NCCL on GPUs, gloo on CPU), let the main process decide (and speak) for every rank, and leave cleanly."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .run_lock import release_held


@dataclass(frozen=True)
class Launch:
    """This process's place: global rank, world size, local rank, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 120.0, cpu: bool | None = None) -> Launch:
    """Init torch.distributed from the launcher's environment (no-op for a single plain process).

    ``cpu``: force gloo on CPU (default: CPU only when CUDA is unavailable). The long default timeout lets
    a slow ZeRO-offload step or a 1M-token eval pass finish without the collective timing out.
    """
    use_cpu = not torch.cuda.is_available() if cpu is None else cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if use_cpu else torch.device("cuda", local_rank)
    if not use_cpu:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if use_cpu else "nccl", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({} if use_cpu else {"device_id": device}))
    return Launch(rank, world, local_rank, device)


T = TypeVar("T")


def main_decides(fn: Callable[[], T], main: bool) -> T:
    """Collective: call ``fn`` on the main process only; every rank returns its result or exits with its
    SystemExit (another exception on the main process reaches the others as a SystemExit naming it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "fake":
        return fn()  # one process (a fake group: benchmarks/emulate_rank.py emulates one rank, alone)
    box: list = [None]
    error = None
    if main:
        try:
            box[0] = ("value", fn())
        except SystemExit as e:
            box[0] = ("exit", e.code)
        except Exception as e:
            error = e
            box[0] = ("exit", f"the main process failed: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "exit":
        raise SystemExit(value)
    return value


def run_script(main: Callable[[], None]) -> None:
    """Run a launched script's ``main``. A SystemExit carrying a message (a refusal: bad flags, an output
    directory in use; ``main_decides`` raises it on every rank) is printed by rank 0 alone and handed to the
    launcher's failure report (torchrun's error file: the report names it instead of "To enable traceback see
    ..."); the other ranks exit with the same code without a word, unless alone in a fake group (an emulated
    rank). Other exceptions show on every rank.
    Every rank then ends as ``finish`` does."""
    try:
        main()
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            alone = dist.is_available() and dist.is_initialized() and dist.get_backend() == "fake"  # emulated rank
            if os.environ.get("RANK", "0") == "0" or alone:
                print(code, file=sys.stderr)
                _tell_launcher(str(code))
            code = 1  # what Python exits with for a SystemExit carrying a message
        finish(code or 0)  # without it, gloo may abort at interpreter exit and turn the code into SIGABRT


def _tell_launcher(message: str) -> None:
    """Leave ``message`` where torch.distributed.elastic (accelerate launch, torchrun) reads a worker's failure."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the report then points at torch's docs, as without this


def finish(code: int = 0) -> None:
    """End a script: release this process's output-directory lock, close the process group and exit with
    ``code`` without running C++ destructors.

    Gloo sometimes aborts in a destructor at interpreter exit ("terminate called without an active
    exception") after every collective has completed, which turns a finished run into a failure. Call
    this last, after all output is written; a plain single process returns (``code`` 0) or exits.
    """
    release_held()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
