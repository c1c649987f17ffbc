"""Tiled MLP: a decoder layer's MLP run over sequence tiles, so its [S, intermediate] activations exist for
one tile at a time, in forward and in backward (the TiledMLP of Arctic Long Sequence Training).

Forward runs the tiles under no_grad and saves only the input [B, S, H]. Backward recomputes one tile at a
time with grad enabled (under forward's autocast) and backpropagates it at once: the input gradient is written
into its slice, the parameter gradients accumulate into ``.grad`` (so ``torch.autograd.grad`` with MLP
parameters as inputs is not supported). Exact: the MLP acts on each token on its own, so only the order in
which the parameter gradients are summed changes; bf16/fp16 parameter gradients are summed over the tiles in
float32 and rounded once, as one matmul over the whole sequence would (summed in bf16, every tile would add
a rounding: ~1.5x bf16's own gradient error at 64 tiles).

Parameters are never read directly. Forward tiles run the MLP's original forward inside the call that the
layer made (``mlp(hidden)``); each backward tile calls the module itself again (``mlp(tile)``), so hooks that
gather parameters around module calls (DeepSpeed ZeRO-3) run there as they do in forward. DeepSpeed
(ZeRO 1-3) reduces a parameter's gradient when its accumulation hook fires; ``ds_grad_is_ready`` (read by
DeepSpeed, harmless elsewhere) is False for every tile but the last, so it reduces the finished sum once.
Trainers whose per-parameter gradient hooks must fire once per backward (DDP's reducer) are not supported.
Under ZeRO-3 every rank must run the same number of tiles (each gathers parameters collectively): give all
ranks the same local sequence length, as easy_context's sequence-parallel inputs do.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

Tensor = torch.Tensor
_ATTR = "_easy_context_tiled_mlp"


class _TiledState:
    """What a wrapped MLP needs: its original forward, the tile size, and whether a call should bypass tiling."""

    def __init__(self, forward, tile_tokens: int):
        self.forward = forward
        self.tile_tokens = tile_tokens
        self.bypass = False

    @contextmanager
    def bypassed(self):
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous


def _tile_length(x: Tensor, tile_tokens: int) -> int:
    """Sequence positions per tile of x [..., S, H], counting the tokens of all leading (batch) rows."""
    return max(1, tile_tokens // max(1, x.shape[:-2].numel()))


def _tiles(x: Tensor, tile_tokens: int) -> list[tuple[int, int]]:
    """(start, length) of the sequence tiles of x [..., S, H]; the last one is shorter when S is not a multiple."""
    step = _tile_length(x, tile_tokens)
    return [(a, min(step, x.shape[-2] - a)) for a in range(0, x.shape[-2], step)]


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Float32GradSum:
    """While active, 16-bit parameters' per-tile gradients are summed in float32 and handed to autograd once, at
    the tile marked ``last`` (zeros before): ``.grad`` then takes one rounding, as without tiles, instead of one
    per tile. Hooks, not ``.grad``: under ZeRO-3 the gradients exist only while autograd passes them on."""

    def __init__(self, params):
        self.last = False
        self.sums: dict[int, Tensor] = {}
        self.handles = [p.register_hook(self._hook(id(p))) for p in params
                        if p.dtype in (torch.float16, torch.bfloat16)]

    def _hook(self, key: int):
        def hook(grad: Tensor) -> Tensor:
            total = self.sums.get(key)
            total = grad.float() if total is None else total.add_(grad)
            if self.last:
                self.sums.pop(key, None)
                return total.to(grad.dtype)
            self.sums[key] = total
            return torch.zeros_like(grad)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.sums.clear()


class _TiledMLP(torch.autograd.Function):
    """y = mlp(x) tile by tile; saves x only. The gradients of ``params`` (the MLP's trainable parameters) are
    accumulated into their ``.grad`` in backward, never returned: the parameters are not inputs, since under
    ZeRO-3 they are empty placeholders here and autograd would expect gradients of that empty shape. ``anchor``,
    an empty tensor that requires grad, makes y require grad when x does not (say, LoRA on the MLP only)."""

    @staticmethod
    def forward(ctx, mlp, state, params, x, anchor):
        ctx.mlp, ctx.state, ctx.params = mlp, state, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for a, n in _tiles(x, state.tile_tokens):
                y = state.forward(x.narrow(-2, a, n))
                if not isinstance(y, Tensor) or y.shape[:-1] != x.shape[:-2] + (n,):
                    raise TypeError(f"tiled MLP: {type(mlp).__name__} must map [..., S, H] to one tensor "
                                    f"[..., S, H_out]; got {type(y).__name__} for a {tuple(x.shape)} tile input")
                if out is None:
                    out = y.new_empty(x.shape[:-1] + y.shape[-1:])
                out.narrow(-2, a, n).copy_(y)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        mlp, state, params = ctx.mlp, ctx.state, ctx.params
        dx = torch.empty_like(x) if ctx.needs_input_grad[3] else None
        tiles = _tiles(x, state.tile_tokens)
        enabled, dtype = ctx.autocast
        sums = _Float32GradSum(params)
        try:
            for i, (a, n) in enumerate(tiles):
                sums.last = i == len(tiles) - 1
                for p in params:
                    p.ds_grad_is_ready = sums.last
                xt = x.narrow(-2, a, n).detach().requires_grad_(dx is not None)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled), \
                        state.bypassed():
                    yt = mlp(xt)  # the module call, so its (and its children's) hooks run
                torch.autograd.backward(yt, grad_out.narrow(-2, a, n))
                if dx is not None:
                    dx.narrow(-2, a, n).copy_(xt.grad)
        finally:
            sums.remove()
            for p in params:
                p.ds_grad_is_ready = True
        return None, None, None, dx, None


def _tiled_forward(self: torch.nn.Module, hidden_states: Tensor, *args, **kwargs) -> Tensor:
    # Bound to the module as its forward (a method, so deepcopy rebinds it to the copy).
    state = getattr(self, _ATTR)
    if state.bypass or args or kwargs or hidden_states.dim() < 2 \
            or hidden_states.shape[-2] <= _tile_length(hidden_states, state.tile_tokens):
        return state.forward(hidden_states, *args, **kwargs)
    params = [p for p in self.parameters() if p.requires_grad]
    anchor = torch.empty(0, device=hidden_states.device, requires_grad=bool(params))
    return _TiledMLP.apply(self, state, params, hidden_states, anchor)


def tiled_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that ``apply_tiled_mlp`` made tiled."""
    return [m for m in model.modules() if hasattr(m, _ATTR)]


def _default_tile_tokens(model: torch.nn.Module) -> int:
    # A tile's [T, intermediate] activation then holds as many elements as one MLP weight matrix.
    return int(getattr(getattr(model, "config", None), "hidden_size", None) or 4096)


def apply_tiled_mlp(model: torch.nn.Module, tile_tokens: int | None = None) -> int:
    """Run every decoder layer's ``mlp`` (hidden [B, S, H] -> [B, S, H]) in sequence tiles of ``tile_tokens``
    tokens (default: the model's hidden size); returns the number of MLP modules tiled.

    Wraps each module's forward in place (parameter names and state dicts are unchanged); applying again
    only changes the tile size. Raises ValueError if the model has no ``mlp`` child, or if an MLP is a
    mixture of experts or has dropout (tiles would not compute the same function as the whole sequence).
    """
    if tile_tokens is None:
        tile_tokens = _default_tile_tokens(model)
    if not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(f"tile_tokens must be a positive int; got {tile_tokens!r}")
    mlps = {id(m.mlp): m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), torch.nn.Module)}
    if not mlps:
        raise ValueError(f"apply_tiled_mlp: {type(model).__name__} has no module with an `mlp` child "
                         "(decoder layers of Llama, Mistral, Qwen2/3 have `layer.mlp`); nothing to tile")
    for mlp in mlps.values():
        if hasattr(mlp, "experts"):
            raise ValueError(f"apply_tiled_mlp: {type(mlp).__name__} is a mixture of experts; routing (capacity, "
                             "auxiliary losses) is not per token, so tiling would change it")
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in mlp.modules()):
            raise ValueError(f"apply_tiled_mlp: {type(mlp).__name__} has dropout; the backward recompute would "
                             "draw a different mask")
    for mlp in mlps.values():
        state = getattr(mlp, _ATTR, None)
        if state is None:
            state = _TiledState(mlp.forward, tile_tokens)
            setattr(mlp, _ATTR, state)
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        state.tile_tokens = tile_tokens
    return len(mlps)
