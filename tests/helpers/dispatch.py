"""Record which aten ops run while some code runs (by overload packet name), with their tensor inputs' dtypes."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Inside ``with``: ``seen`` lists (op name, its tensor inputs' dtypes) of each op named in ``names``."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = set(names)
        self.seen: list[tuple[str, tuple]] = []

    @property
    def count(self) -> int:
        return len(self.seen)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.names:
            self.seen.append((name, tuple(a.dtype for a in args if isinstance(a, Tensor))))
        return func(*args, **(kwargs or {}))
