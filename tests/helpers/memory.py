"""Record the largest tensor allocated while some code runs (views of existing storage do not count)."""

from __future__ import annotations

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
