"""The sequential loop: the reference every other backend is held to.

x_t = a_t x_{t-1} + b_t for t = 1..T with x_0 = x0 (zeros when None); with ``reverse`` the loop
runs from the end, x_t = a_t x_{t+1} + b_t with x_{T+1} = x0. One Python step per time step,
so it is slow for long sequences and exact by construction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import a_time, apply_add, batch_shape_of


def sequential_scan(
    a: Tensor, b: Tensor, x0: Tensor | None, *, dense: bool, reverse: bool = False
) -> Tensor:
    T, D = b.shape[-2], b.shape[-1]
    batch = batch_shape_of(a, b, x0, dense)
    out = torch.empty((*batch, T, D), dtype=b.dtype, device=b.device)  # (..., T, D)
    x = x0 if x0 is not None else torch.zeros((*batch, D), dtype=b.dtype, device=b.device)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    for t in steps:
        x = apply_add(a_time(a, t, dense), x, b[..., t, :], dense)  # (..., D)
        out[..., t, :] = x
    return out
