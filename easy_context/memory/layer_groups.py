"""Checkpoint groups of k consecutive decoder layers: gradient checkpointing keeps the input of the first layer of
each group only and the backward recomputes the group, so ceil(L / k) layer inputs wait from forward to backward
instead of L (with ``OffloadedCheckpoint``, k times less pinned host memory).

How a group is recomputed (``GROUP_RECOMPUTE``):
- "layer" (the default): each layer but the last runs in a checkpoint of its own inside the group's. The group's
  recompute then keeps only those layers' inputs, and each layer's backward recomputes its own activations, so the
  backward holds one layer's activations and k - 1 layer inputs at once. The cost: the first k - 1 layers of a
  group run their forward a third time.
- "group": the group's recompute keeps every layer's activations, k layers' at once on the device, for one forward
  fewer per layer.

How: the model's layer loop still calls every layer. transformers checkpoints a layer in its ``forward`` (5.25)
or around its module call (5.0-5.17); both are taken. The first layer of a group (its leader) runs, inside its one
checkpoint region, its own forward and then the other k - 1 layers' forwards with the same arguments, and returns
the group's output; each of the other layers (followers) checks that it was called with that output and the
leader's arguments, and passes its input through. Exact: the same layer forwards run on the same values, once in
forward and again in the recompute (twice for the nested layers), like per-layer checkpointing. Module hooks of a
follower layer itself (not of its submodules) run at its pass-through, outside the region: DeepSpeed ZeRO-3
gathers parameters around submodule calls, so it works; a wrapper that gathers a whole layer's parameters at the
layer (FSDP2) would not.

The arguments must be the same for every layer of a group: refused before loading where the config's
``layer_types`` differ within a group (Qwen2/Qwen3 sliding-window layers get another mask), and checked on every
call otherwise. Where a forward collects per-layer outputs (``output_hidden_states``), the groups run one layer
per checkpoint for that call, so each layer's output is its own. State-dict keys are unchanged (the layers stay
where they are; only their ``forward`` is wrapped per instance).
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint as plain_checkpoint

try:  # transformers 5.x: the per-layer outputs being collected by the current forward (hidden states, attentions)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers return per-layer outputs from the layer loop itself
    _active_collector = None

Tensor = torch.Tensor
_ATTR = "_easy_context_layer_group"
GROUP_RECOMPUTE = ("layer", "group")


def group_inputs(layers: int, k: int) -> int:
    """Layer inputs kept for the backward when ``layers`` consecutive checkpointed layers run in groups of ``k``."""
    return math.ceil(layers / k) if layers > 0 else 0


def valid_group_sizes(layer_types: Sequence[str]) -> list[int]:
    """The group sizes k for which no group of consecutive layers mixes two of ``layer_types``."""
    n = len(layer_types)
    return [k for k in range(1, n + 1)
            if all(len(set(layer_types[a:a + k])) == 1 for a in range(0, n, k))]


def check_layer_groups(num_layers: int, k: int, *, skip_last: int = 0,
                       layer_types: Sequence[str] | None = None) -> None:
    """Before any weights load: ValueError, saying what to change, unless groups of ``k`` layers can be
    checkpointed exactly: k >= 1, k <= ``num_layers``, checkpointing on (``skip_last`` >= 0), and the
    checkpointed layers of each group share one entry of ``layer_types`` (the config's, when it has one)."""
    if k < 1:
        raise ValueError(f"layers per checkpoint must be at least 1 (1: every layer its own checkpoint); got {k}")
    if k == 1:
        return
    if skip_last < 0:
        raise ValueError(f"checkpointing {k} layers together needs gradient checkpointing: drop one of the two "
                         "options")
    if k > num_layers:
        raise ValueError(f"the model has {num_layers} layers: cannot checkpoint {k} layers together; choose at most "
                         f"{num_layers}")
    checkpointed = list(layer_types or [])[:num_layers - skip_last]
    if checkpointed and k not in valid_group_sizes(checkpointed):
        raise ValueError(f"the model's layers are of types {list(layer_types or [])}: a group of {k} consecutive "
                         "layers would mix types, which get different attention masks; choose layers per "
                         f"checkpoint among {valid_group_sizes(checkpointed)}")


def _capturing_outputs() -> bool:
    return _active_collector is not None and bool(_active_collector.get())


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    # the same values: one storage seen alike (DeepSpeed hands a layer's output on as a detached alias)
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


def _same(a: Any, b: Any) -> bool:
    """Whether a follower's argument ``a`` is the leader's ``b`` (tensors: the same memory; plain values: equal)."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return _same_tensor(a, b)
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str)) and type(a) is type(b):
        return a == b
    return False


_UNEXPECTED = ("checkpointing layers in groups: {} was checkpointed through an unexpected function (this "
               "transformers version checkpoints layers another way); use 1 layer per checkpoint")


class _Pending:
    """A group's forward that ran in its leader's checkpoint: its output, and the arguments the leader got."""

    __slots__ = ("output", "args", "kwargs", "next")

    def __init__(self, output: Tensor, args: tuple, kwargs: dict):
        self.output, self.args, self.kwargs, self.next = output, args, kwargs, 0


class LayerGroup:
    """k consecutive checkpointed decoder layers run in one checkpoint region of their first layer."""

    def __init__(self, layers: list[torch.nn.Module], checkpoint_fn: Callable, recompute: str = "layer"):
        if recompute not in GROUP_RECOMPUTE:
            raise ValueError(f"a group is recomputed by one of {GROUP_RECOMPUTE}; got {recompute!r}")
        self.leader, self.followers = layers[0], layers[1:]
        self.checkpoint_fn = checkpoint_fn  # the leader's checkpoint function (plain or OffloadedCheckpoint)
        self.recompute = recompute
        self.call: tuple[tuple, dict] | None = None  # the leader's call in progress: (args, kwargs)
        self.pending: _Pending | None = None

    def leader_forward(self, forward: Callable, *args, **kwargs) -> Any:
        """The leader's module forward: transformers' checkpointing wrapper calls ``checkpoint`` below when
        it checkpoints (training with autograd on), else the layer runs alone."""
        self.pending, self.call = None, (args, kwargs)
        try:
            return forward(*args, **kwargs)
        finally:
            self.call = None

    def checkpoint(self, function: Callable, *args, **options) -> Any:
        """The leader's ``_gradient_checkpointing_func``: runs the leader and its followers with the same arguments
        in one checkpoint region. ``function`` is transformers' ``partial(forward, leader, **kwargs)`` from inside
        the module call (transformers 5.25), or ``partial(leader.__call__, **kwargs)`` around it (5.0-5.17)."""
        if _capturing_outputs():  # per-layer outputs wanted: each layer its own
            return self.checkpoint_fn(function, *args, **options)
        if not isinstance(function, functools.partial):
            raise RuntimeError(_UNEXPECTED.format(type(self.leader).__name__))
        kwargs = function.keywords
        if getattr(function.func, "__self__", None) is self.leader and not function.args:  # the module call
            call = (args, kwargs)
            forwards = [getattr(layer, _ATTR)[2] for layer in self.followers]  # each one's forward as defined
            steps = [function] + [functools.partial(forward, **kwargs) for forward in forwards]
        elif function.args == (self.leader,):  # the leader's forward, inside its module call
            call = self.call
            if call is None:  # called outside its module call
                return self.checkpoint_fn(function, *args, **options)
            steps = [function] + [functools.partial(function.func, layer, **kwargs) for layer in self.followers]
        else:
            raise RuntimeError(_UNEXPECTED.format(type(self.leader).__name__))
        nested = self.recompute == "layer"
        followers = self.followers

        def run_group(hidden: Tensor, *rest):
            out = hidden
            for i, step in enumerate(steps):
                if i and not isinstance(out, Tensor):
                    raise TypeError(f"checkpointing layers in groups: {type(followers[i - 1]).__name__} gets "
                                    f"{type(out).__name__}, not the hidden states alone; use 1 layer per checkpoint")
                # a nested checkpoint saves its input through the group's: dropped in forward, kept while the
                # group recomputes; the last layer's own backward comes first, so it needs none
                nest = nested and i < len(steps) - 1
                out = plain_checkpoint(step, out, *rest, use_reentrant=False) if nest else step(out, *rest)
            return out

        output = self.checkpoint_fn(run_group, *args, **options)
        self.pending = _Pending(output, *call)
        return output

    def follower_checkpoint(self, own: Callable) -> Callable:
        """A follower's ``_gradient_checkpointing_func``, given its own (``own``): while its group's forward is
        pending, its module call (transformers 5.0-5.17 checkpoints there) passes its input through with no region
        of its own; otherwise ``own``."""

        def checkpoint(function: Callable, *args, **options) -> Any:
            if self.pending is not None:
                return function(*args)
            return own(function, *args, **options)

        return checkpoint

    def follower_forward(self, index: int, forward: Callable, *args, **kwargs) -> Any:
        """Follower ``index``'s module forward: its input when the leader ran the group, else its own forward."""
        pending = self.pending
        if pending is None:
            return forward(*args, **kwargs)
        layer = self.followers[index]
        what = None
        if pending.next != index:
            what = f"after follower {pending.next} of its group was due"
        elif not args or not isinstance(args[0], Tensor) or not _same_tensor(args[0], pending.output):
            what = "with other hidden states than its group's output (the model does more between layers)"
        elif not (_same(args[1:], pending.args[1:]) and kwargs.keys() == pending.kwargs.keys()
                  and all(_same(v, pending.kwargs[n]) for n, v in kwargs.items())):
            differ = sorted(n for n in kwargs.keys() | pending.kwargs.keys()
                            if n not in kwargs or n not in pending.kwargs or not _same(kwargs[n], pending.kwargs[n]))
            what = f"with other arguments than the first layer of its group ({', '.join(differ) or 'positional'})"
        if what is not None:
            self.pending = None
            raise RuntimeError(f"checkpointing layers in groups: {type(layer).__name__} was called {what}, so "
                               "the group's forward did not compute it; use 1 layer per checkpoint for this model")
        pending.next += 1
        if pending.next == len(self.followers):
            self.pending = None
        return args[0]


def _leader_forward(self: torch.nn.Module, *args, **kwargs):
    # bound to the layer as its forward (a method, so deepcopy rebinds it to the copy)
    group, _, forward = getattr(self, _ATTR)
    return group.leader_forward(forward, *args, **kwargs)


def _follower_forward(self: torch.nn.Module, *args, **kwargs):
    group, index, forward = getattr(self, _ATTR)
    return group.follower_forward(index, forward, *args, **kwargs)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules a transformers model can checkpoint one by one (flag set or not), in forward order."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")
            and not any(c is not m and hasattr(c, "gradient_checkpointing") for c in m.modules())]


def group_checkpointed_layers(model: torch.nn.Module, k: int, recompute: str = "layer") -> list[LayerGroup]:
    """Checkpoint ``model``'s checkpointed decoder layers (a transformers model with gradient checkpointing
    on, the last layers possibly left out) in groups of ``k`` consecutive layers, the last group possibly
    shorter, each recomputed as ``recompute`` says (``GROUP_RECOMPUTE``); returns the groups of more than one
    layer. Each group uses its first layer's checkpoint function (say an ``OffloadedCheckpoint``). Call it once,
    after every other change to checkpointing."""
    config = getattr(model, "config", None)
    layers = decoder_layers(model)
    flags = [m.gradient_checkpointing is True for m in layers]
    checkpointed = sum(flags)
    check_layer_groups(len(layers), k, layer_types=getattr(config, "layer_types", None),
                       skip_last=len(layers) - checkpointed if checkpointed else -1)
    if k == 1:
        return []
    if flags != [True] * checkpointed + [False] * (len(layers) - checkpointed):
        raise ValueError("checkpointing layers in groups needs the checkpointed layers to come first and in a row "
                         f"(checkpointed: {flags}); checkpoint every layer, or leave out only the last ones")
    if any(hasattr(m, _ATTR) for m in layers):
        raise ValueError(f"the layers of {type(model).__name__} are checkpointed in groups already")
    groups = []
    for a in range(0, checkpointed, k):
        members = layers[a:min(a + k, checkpointed)]
        if len(members) < 2:
            continue
        kinds = {type(m) for m in members}
        if len(kinds) > 1:
            raise ValueError(f"layers {a}..{a + len(members) - 1} are of different classes "
                             f"({sorted(c.__name__ for c in kinds)}); checkpoint them one by one (1 layer per "
                             "checkpoint)")
        group = LayerGroup(members, members[0]._gradient_checkpointing_func, recompute)
        members[0]._gradient_checkpointing_func = group.checkpoint
        for m in members[1:]:
            m._gradient_checkpointing_func = group.follower_checkpoint(m._gradient_checkpointing_func)
        for i, m in enumerate(members):
            setattr(m, _ATTR, (group, i - 1, m.forward))
            m.forward = types.MethodType(_leader_forward if i == 0 else _follower_forward, m)
        groups.append(group)
    return groups
