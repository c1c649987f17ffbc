"""Memory of code while it runs: the largest tensor it allocates (views of existing storage do not count), and the
most its tensors hold at once."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestAllocation(TorchDispatchMode):
    """Inside ``with``: ``numel`` is the most elements any op's output storage held, ``op`` that op."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                n = t.untyped_storage().nbytes() // max(t.element_size(), 1)
                if n > self.numel:
                    self.numel, self.op = n, func
        return out


class LivePeak(TorchDispatchMode):
    """Inside ``with``: ``peak`` is the most bytes that tensors created inside held at once, each storage counted
    from the op that allocated it until the tensor it was returned as is freed (views made later do not count)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if ptr in inputs or ptr in self._seen or nbytes == 0:  # in place, a view, or already counted
                continue
            self._seen.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, ptr, nbytes)
        return out
