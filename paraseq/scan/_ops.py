"""Small tensor helpers shared by the scan backends.

Shape letters: T time steps, D state size, ``...`` leading (batch) dims.
Diagonal coefficients ``a`` are (..., T, D); dense ones are (..., T, D, D); ``b`` and the result
``x`` are always (..., T, D). Each helper takes ``dense`` to say which of the two ``a`` is.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply(a: Tensor, x: Tensor, dense: bool) -> Tensor:
    """a_t x: elementwise for diagonal a (..., D), matrix-vector for dense a (..., D, D)."""
    if dense:
        return torch.matmul(a, x.unsqueeze(-1)).squeeze(-1)
    return a * x


def apply_add(a: Tensor, x: Tensor, b: Tensor, dense: bool) -> Tensor:
    """a x + b, fused where torch offers it."""
    if dense:
        return torch.matmul(a, x.unsqueeze(-1)).squeeze(-1) + b
    return torch.addcmul(b, a, x)


def compose(a_later: Tensor, a_earlier: Tensor, dense: bool) -> Tensor:
    """The coefficient of two steps taken one after the other: a_later a_earlier."""
    if dense:
        return torch.matmul(a_later, a_earlier)
    return a_later * a_earlier


def adjoint(a: Tensor, dense: bool) -> Tensor:
    """The conjugate transpose (the coefficient of the adjoint recurrence)."""
    if dense:
        a = a.transpose(-1, -2)
    return a.conj() if a.is_complex() else a


def a_time(a: Tensor, sl: slice | int, dense: bool) -> Tensor:
    """Index the time dim of a: dim -2 for diagonal, -3 for dense."""
    if dense:
        return a[..., sl, :, :]
    return a[..., sl, :]


def flip_time(t: Tensor, dense: bool) -> Tensor:
    """Reverse the time dim (a copy: torch has no negative strides)."""
    return t.flip(-3 if dense else -2)


def batch_shape_of(a: Tensor, b: Tensor, x0: Tensor | None, dense: bool) -> torch.Size:
    """Broadcast shape of the leading dims of a, b and x0 (validated beforehand)."""
    shapes = [a.shape[: a.dim() - (3 if dense else 2)], b.shape[:-2]]
    if x0 is not None:
        shapes.append(x0.shape[:-1])
    return torch.broadcast_shapes(*shapes)
