"""The guard behind ``method="auto"``: before committing to a parallel method, estimate the
recurrence's largest Lyapunov exponent on a short prefix, and take the loop where it is
positive (chaos), where parallel Newton's iterations grow with T and it would crawl.

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..solve.cell import FlatCell
from ..solve.iterate import sequential, shift
from .lle import one_thread

__all__ = ["GUARD_MIN_T", "GUARD_THRESHOLD", "guard_auto", "prefix_exponent"]

GUARD_MIN_T = 512
"""Shorter sequences skip the guard: its prefix would be too short to read, or too costly a
share of the loop, and the solver's own fallback bounds what a crawl can cost."""

GUARD_THRESHOLD = 0.0
"""The loop is taken when the prefix's exponent (the largest over the batch) exceeds this."""


def prefix_length(T: int) -> int:
    """T / 32 steps, at least 16 and at most 128: the guard costs the prefix's loop (L cell
    steps) and one batched Jacobian of its L steps, a small share of the whole loop."""
    return min(128, max(16, T // 32))


def product_exponent(J: Tensor, V: Tensor) -> Tensor:
    """(1 / L) log |J_L ... J_1 v| for J (B, L, D, D) and unit vectors V (S, B, D): (S, B),
    in float64. The product is formed by a tree of batched matmuls (log2 L levels, each
    product rescaled by its norm and the logs kept), not by L sequential steps."""
    B, L, D, _ = J.shape
    P = J.to(torch.float64)
    logs = torch.zeros(B, L, dtype=torch.float64, device=J.device)  # (B, L) log scales
    while P.shape[1] > 1:
        if P.shape[1] % 2:  # an odd count: the last one waits a level, times the identity
            eye = torch.eye(D, dtype=P.dtype, device=P.device).expand(B, 1, D, D)
            P = torch.cat([P, eye], dim=1)
            logs = torch.cat([logs, logs.new_zeros(B, 1)], dim=1)
        P = P[:, 1::2] @ P[:, 0::2]  # (B, L / 2, D, D): later steps on the left
        logs = logs[:, 1::2] + logs[:, 0::2]
        norm = P.flatten(-2).norm(dim=-1).clamp_min(1e-300)  # (B, L / 2)
        P = P / norm[..., None, None]
        logs = logs + norm.log()
    v = V.to(torch.float64)
    out = (P[:, 0] @ v.unsqueeze(-1)).squeeze(-1).norm(dim=-1).log()  # (S, B)
    return (out + logs[:, 0]) / L


@torch.no_grad()
def prefix_exponent(fc: FlatCell, X: Tensor, h0: Tensor, cell_dtype: torch.dtype,
                    steps: int, starts: int = 2) -> float | None:
    """The largest (over the batch) Lyapunov exponent estimate along the loop's trajectory of
    the first ``steps`` steps of X (B, T, n) from h0 (B, D): the Jacobians of those steps at
    once (the cell's own or autograd's), their product by ``product_exponent``. The random
    starts come from a fixed-seed generator: the caller's random state is left alone and the
    choice is reproducible. None where the Jacobians would be too large to form (B L D^2 over
    2^24 scalars)."""
    B, D = X.shape[0], h0.shape[-1]
    diagonal = fc.diag_exact
    if not diagonal and B * steps * D * D > 1 << 24:
        return None
    with one_thread(B * D * D < 1 << 16):
        Xp = X[:, :steps]  # (B, L, n)
        H = sequential(fc, Xp, h0.to(cell_dtype), cell_dtype)  # (B, L, D)
        if not bool(torch.isfinite(H).all()):
            return float("inf")  # the loop itself blows up: no parallel method does better
        rows_x = Xp.reshape(B * steps, -1)
        rows_h = shift(H, h0.to(cell_dtype)).reshape(B * steps, D)
        if diagonal:  # J diagonal: each unit's own growth rate; the largest over the units
            res = fc.analytic_diag(rows_x, rows_h)
            d = (res if res is not None else fc.autograd_diag(rows_x, rows_h))[1]
            rate = d.to(torch.float64).abs().log().reshape(B, steps, D).mean(1)  # (B, D)
            return float(rate.max())
        res = fc.analytic_full(rows_x, rows_h) if fc.has_full else None
        J = (res if res is not None else fc.autograd_full(rows_x, rows_h))[1]
        gen = torch.Generator().manual_seed(0)
        V = torch.randn(starts, B, D, generator=gen, dtype=torch.float64).to(X.device)
        V = V / V.norm(dim=-1, keepdim=True)  # (S, B, D)
        rate = product_exponent(J.reshape(B, steps, D, D), V)  # (S, B)
    return float(rate.max(0).values.max())


def guard_auto(fc: FlatCell, X: Tensor, h0: Tensor, cell_dtype: torch.dtype,
               name: str) -> tuple[str, float | None]:
    """(method, exponent): ``name`` (the parallel method ``choose_method`` picked) unless the
    prefix's exponent exceeds ``GUARD_THRESHOLD``, then ``"sequential"``; exponent None when
    the guard did not run (T < ``GUARD_MIN_T``, or Jacobians too large to form)."""
    T = X.shape[1]
    if T < GUARD_MIN_T:
        return name, None
    lle = prefix_exponent(fc, X, h0, cell_dtype, prefix_length(T))
    if lle is None:
        return name, None
    return ("sequential" if lle > GUARD_THRESHOLD else name), lle
