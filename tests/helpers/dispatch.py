"""Record which aten ops run while some code runs (by overload packet name), with their tensor inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


MATMULS = ("mm", "addmm", "addmm_", "bmm", "matmul", "linear")  # the aten ops a matrix product dispatches to


class Op(NamedTuple):
    name: str
    dtypes: tuple[torch.dtype, ...]  # of its tensor inputs
    shapes: tuple[tuple[int, ...], ...]


class OpCounter(TorchDispatchMode):
    """Inside ``with``: ``seen`` lists an ``Op`` for each run of an op named in ``names``."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = set(names)
        self.seen: list[Op] = []

    @property
    def count(self) -> int:
        return len(self.seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.names:
            tensors = [a for a in args if isinstance(a, Tensor)]
            self.seen.append(Op(name, tuple(t.dtype for t in tensors), tuple(tuple(t.shape) for t in tensors)))
        return func(*args, **(kwargs or {}))
