"""Gradients that hold only bf16 values, kept in bf16 until the optimizer step: 2 bytes a number instead of 4.

Under bf16 autocast a linear layer's float32 weight is cast to bf16 for its matmul, so the weight's gradient is
that matmul's bf16 output: autograd would cast it to a float32 ``.grad`` that holds bf16 numbers only. Here each
such layer casts its weight itself, and the cast's backward takes the bf16 gradient as it is: no float32 copy is
made, and a backward holds half the bytes for these gradients (on the Llama shapes, 79% of the parameters at 1B
and 87% at 8B). The step then rebuilds float32 gradients a chunk of parameters at a time, clips them by the same
total norm and steps the optimizer on that chunk only: parameters, moments and the clipping are bitwise those of
the float32 path, since each gradient's norm is taken in float32 (by the kernel ``clip_grad_norm_`` uses) and
AdamW acts on each number alone. The layers also cast a float32 input once for all of them (q, k and v take one
norm output), where autocast would cast it per layer; each layer's input gradient is still cast back on its own.

Use it where every weight it takes gets one gradient per optimizer step: one process (no DDP reducer reading
``.grad``), no gradient accumulation, bf16 autocast with float32 weights. Weights whose gradient is a float32 sum
(tied embeddings, an output layer whose loss accumulates its gradient in float32, a tiled MLP's per-tile sums) are
left out; ``linear_weights`` picks the others. A layer run outside bf16 autocast gets a float32 gradient in
``.grad`` as usual; on the first step it is checked before it is stored, and a weight whose gradient is not a bf16
number keeps float32 gradients from then on, so nothing is ever rounded.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attention.precision import SharedCasts, autocast_dtype
from ..memory.tiled_mlp import tiled_mlps

Tensor = torch.Tensor
CHUNK_BYTES = 1 << 30  # float32 gradients rebuilt at once in the step


def bf16_grads_blocker(*, gpu: bool, deepspeed: bool, processes: int) -> str | None:
    """Why bf16 gradient storage cannot hold a run's gradients (None: it can; ``--grad-accum`` is the config's)."""
    if not gpu:
        return "its gradients are bf16 numbers only under a CUDA GPU's bf16 autocast (on CPU they are float32)"
    if deepspeed:
        return "DeepSpeed holds the gradients itself (in bf16 already)"
    if processes > 1:
        return f"with {processes} processes DDP's reducer holds the gradients in float32 buckets"
    return None


def check_bf16_grads(*, gpu: bool, deepspeed: bool, processes: int) -> None:
    """SystemExit, before any weights load, where ``--bf16-grads`` cannot hold a run's gradients exactly."""
    why = bf16_grads_blocker(gpu=gpu, deepspeed=deepspeed, processes=processes)
    if why:
        raise SystemExit(f"--bf16-grads: {why}; leave the flag out")


def linear_weights(model: torch.nn.Module, exclude: set[int] = frozenset()) -> list[tuple[str, torch.nn.Linear]]:
    """(weight name, layer) of ``model``'s ``nn.Linear`` layers with a trainable float32 weight, in model order,
    leaving out those whose weight's ``id`` is in ``exclude`` and any weight another module also holds (tied
    embeddings)."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    out = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and isinstance(w, torch.nn.Parameter) and w.requires_grad
                and w.dtype == torch.float32 and id(w) not in exclude and holders[id(w)] == 1):
            out.append((f"{name}.weight" if name else "weight", module))
    return out


def bf16_gradient_weights(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """``linear_weights`` of a causal LM whose gradients are bf16 numbers under bf16 autocast: without the output
    layer (the chunked loss sums its gradient in float32) and tiled MLPs (a sum over tiles in float32)."""
    head = model.get_output_embeddings()
    exclude = {id(p) for m in [*tiled_mlps(model), *([head] if head is not None else [])] for p in m.parameters()}
    return linear_weights(model, exclude)


class _CastForMatmul(torch.autograd.Function):
    """``weight.to(bf16)`` whose backward hands the bf16 gradient to ``take`` instead of to ``weight``."""

    @staticmethod
    def forward(ctx, weight: Tensor, take: Callable[[Tensor], None]) -> Tensor:
        ctx.take = take
        return weight.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.take(grad)
        return None, None


def _linear_forward(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear.forward``, with the weight cast by ``_CastForMatmul`` where autocast would cast it to bf16
    (``layer.bf16_take``: where the gradient goes; ``layer.bf16_keep_float32()``: the weight was found float32)
    and a float32 input cast by ``layer.bf16_inputs``, once for all the layers that take it."""
    w = layer.weight
    cast = torch.is_grad_enabled() and w.requires_grad and autocast_dtype(x.device.type) == torch.bfloat16
    if cast and not layer.bf16_keep_float32():
        w = _CastForMatmul.apply(w, layer.bf16_take)
    if cast and x.dtype == torch.float32:
        x = layer.bf16_inputs.cast(x, torch.bfloat16)
    return F.linear(x, w, layer.bias)


class Bf16Gradients:
    """Keeps the gradients of ``weights`` ((weight name, linear layer) pairs, float32 weights) in bf16 from the
    moment the backward makes each until ``step``; their ``.grad`` stays None in between (except for weights the
    first step found float32). Each layer's forward is replaced by one that casts its weight itself and shares its
    input's cast (``SharedCasts``). ``step`` replaces clipping and ``optimizer.step()`` for all of ``params`` (the
    optimizer's parameters, in the order clipping would take)."""

    def __init__(self, weights: list[tuple[str, torch.nn.Linear]], params: list[torch.nn.Parameter],
                 chunk_bytes: int = CHUNK_BYTES):
        self.names = {id(m.weight): name for name, m in weights}
        self.params = list(params)
        missing = set(self.names) - {id(p) for p in self.params}
        if missing:
            raise ValueError(f"Bf16Gradients: {len(missing)} weights are not among the optimizer's parameters "
                             f"(e.g. {next(self.names[k] for k in missing)})")
        self.chunk_bytes = chunk_bytes
        self.grads: dict[int, Tensor] = {}
        self.norms: dict[int, Tensor] = {}
        self.first = True  # the first step checks each float32 .grad before storing it
        self.float32: set[int] = set()  # weights whose gradients are not bf16 numbers: left in .grad
        inputs = SharedCasts()
        for _, layer in weights:
            key = id(layer.weight)
            layer.bf16_take = functools.partial(self._take_bf16, key)
            layer.bf16_keep_float32 = functools.partial(self.float32.__contains__, key)
            layer.bf16_inputs = inputs
            layer.forward = types.MethodType(_linear_forward, layer)
            layer.weight.register_post_accumulate_grad_hook(self._take)

    def _refuse_second(self, key: int) -> None:
        if key in self.grads:
            raise RuntimeError(f"{self.names[key]} got a second gradient before the optimizer step (gradient "
                               "accumulation, or the weight used outside its layer); bf16 gradient storage needs "
                               "one per step: pass --no-bf16-grads")

    def _take_bf16(self, key: int, grad: Tensor) -> None:
        self._refuse_second(key)
        self.norms[key] = torch._foreach_norm([grad], 2.0, dtype=torch.float32)[0]
        self.grads[key] = grad

    def _take(self, p: torch.nn.Parameter) -> None:
        """A float32 ``.grad`` (the layer ran outside bf16 autocast): stored in bf16 where it holds bf16 numbers."""
        key = id(p)
        if key in self.float32 or p.grad is None:  # None: the gradient went to _take_bf16 (the hook runs anyway)
            return
        self._refuse_second(key)
        g = p.grad
        stored = g.to(torch.bfloat16)
        if self.first and bool((stored.float() != g).any()):  # a sync per weight, on the first step only
            self.float32.add(key)
            return
        self.norms[key] = torch._foreach_norm([g], 2.0)[0]
        self.grads[key] = stored
        p.grad = None

    def _report_float32(self) -> None:
        self.first = False
        if self.float32:
            names = [self.names[k] for k in self.names if k in self.float32]
            more = " ..." if len(names) > 4 else ""
            print(f"bf16 gradient storage: {len(names)} weights whose gradients are not bf16 numbers keep float32 "
                  f"gradients (matmuls outside bf16 autocast?): {', '.join(names[:4])}{more}", file=sys.stderr,
                  flush=True)

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> Tensor:
        """Clip all gradients to ``max_grad_norm`` (``clip_grad_norm_``'s rule, its norm bit for bit) and step
        ``optimizer`` over them, one chunk of parameters at a time; leaves every ``.grad`` None. Returns the norm
        before clipping."""
        if self.first:
            self._report_float32()
        # the gradients not stored leave .grad too, so that each chunk's optimizer step sees its own only
        held = [p for p in self.params if p.grad is not None]
        if held:
            self.norms.update(zip(map(id, held), torch._foreach_norm([p.grad for p in held], 2.0)))
            for p in held:
                self.grads[id(p)], p.grad = p.grad, None
        order = [p for p in self.params if id(p) in self.grads]
        total = torch.linalg.vector_norm(torch.stack([self.norms[id(p)] for p in order]), 2.0)
        coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
        chunk, size = [], 0
        for p in order:
            chunk.append(p)
            size += p.numel() * 4
            if size >= self.chunk_bytes or p is order[-1]:
                self._step_chunk(optimizer, chunk, [self.grads.pop(id(q)) for q in chunk], coef)
                chunk, size = [], 0
        self.norms.clear()
        return total

    @staticmethod
    def _step_chunk(optimizer, chunk: list[torch.nn.Parameter], grads: list[Tensor], coef: Tensor) -> None:
        for p, g in zip(chunk, grads):
            p.grad = g.to(p.dtype)
        grads = [p.grad for p in chunk]
        torch._foreach_mul_(grads, coef.to(grads[0].device))
        optimizer.step()
        for p in chunk:
            p.grad = None
