"""Double backward and batched gradients through the modules' fast paths.

The compiled loop, the compiled Newton sweeps and ``solve_recurrence`` each carry a backward
that runs outside autograd (a numba adjoint, an implicit adjoint scan): exact and fast, but
once-differentiable and opaque to vmap. ``twice`` wraps one layer and direction of such a path
so that

- a plain backward runs the path's own backward, unchanged (the path ran under autograd on
  detached leaves inside ``forward``; ``backward`` asks that inner graph for the
  vector-Jacobian product);
- a backward with ``create_graph=True`` (gradient penalties, meta-learning, gradgradcheck) or
  with batched grad_outputs (``is_grads_batched``, gradcheck's batched check, vmap over a
  backward) computes the same vector-Jacobian product through ``replay``: the layer written
  in differentiable torch ops (torch's own fused kernel for GRU and RNN, a loop over the cell
  otherwise), whose backward autograd can differentiate again and vmap can batch.

The replay costs what torch.nn's own module costs (or a Python loop over time, for LSTM and the
diagonal modules), paid only when a higher-order or batched gradient is asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["twice"]


def _is_batched(t: Tensor | None) -> bool:
    if t is None:
        return False
    ft = getattr(torch._C, "_functorch", None)
    if ft is None:
        return False
    return bool(getattr(ft, "is_batchedtensor", lambda _: False)(t)
                or getattr(ft, "is_legacy_batchedtensor", lambda _: False)(t))


def _vjp(outs: tuple[Tensor, ...], grads: tuple[Tensor, ...], leaves: tuple[Tensor, ...]):
    """torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True), by the
    engine directly where it can (about 10 us less per call: it is on every training step)."""
    if _ENGINE is None:
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
    return _ENGINE.run_backward(outs, grads, True, False, leaves, True, False)


try:
    from torch.autograd.variable import Variable

    _ENGINE = Variable._execution_engine
except (ImportError, AttributeError):  # pragma: no cover - another torch's internals
    _ENGINE = None


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable, replay: Callable, *inputs):
        with torch.enable_grad():
            leaves = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad)
                           for t in inputs)
            outs = run(*leaves)
        ctx.inner = (leaves, outs)
        ctx.replay = replay
        ctx.save_for_backward(*inputs)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        want = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i + 2]]
        result: list[Tensor | None] = [None] * len(inputs)
        if not want:
            return (None, None, *result)
        if torch.is_grad_enabled() or any(_is_batched(g) for g in grads):
            with torch.enable_grad():
                outs = ctx.replay(*inputs)
                got = torch.autograd.grad(outs, [inputs[i] for i in want], grads,
                                          create_graph=torch.is_grad_enabled(),
                                          allow_unused=True)
        else:
            leaves, outs = ctx.inner
            got = _vjp(outs, grads, tuple(leaves[i] for i in want))
        for i, g in zip(want, got, strict=True):
            result[i] = g
        return (None, None, *result)


def twice(run: Callable, replay: Callable, *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """``run(*inputs)`` (a tuple of tensors) with a backward that is differentiable and
    vmap-compatible through ``replay(*inputs)``, the same function in torch ops."""
    return _Twice.apply(run, replay, *inputs)
