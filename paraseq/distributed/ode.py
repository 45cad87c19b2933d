"""``paraseq.distributed.odeint``: an initial value problem whose time grid is split across ranks.

Shape letters: T_r this rank's grid points, ``...`` y0's batch dims, B their product, D state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..ode.api import NEWTON_MAX_ITER, _scalars, _times
from ..ode.field import VectorField
from ..ode.schemes import SCHEMES, RungeKutta
from ..ode.step import StepMap
from ..solve.api import DEFAULT_TOL
from ._comm import Comm
from .solve import solve_recurrence

__all__ = ["odeint"]

SOLVERS = ("newton", "quasi_newton", "picard", "sequential")


def odeint(func: Callable, y0: Tensor, t: Tensor, *, group=None, method: str = "trapezoid",
           solver: str = "newton", tol: float | None = None, max_iter: int | None = None,
           on_failure: str = "fallback", return_info: bool = False):
    """``paraseq.odeint`` with the time grid split across the ranks of ``group``.

    Every rank calls it at once with the same func (the same parameters) and y0 (rank 0's
    is used), and its own consecutive slice of the grid t (T_r,), in rank order (rank 0 holds
    t[0]; slices may differ in length, and any but rank 0's may be empty). The step between
    the last point of one rank and the first of the next
    belongs to the later rank. Returns this rank's states at its points, (T_r, ..., D), rank
    0's starting with y0: the concatenation over ranks is single-process ``paraseq.odeint``'s
    result, to the solver's tolerance.

    method: the implicit scheme (``paraseq.ode.schemes``); solver: ``"newton"``,
    ``"quasi_newton"``, ``"picard"`` or ``"sequential"`` (rank after rank: the reference).
    The solve is ``paraseq.distributed.solve_recurrence`` over the steps, with the scheme's
    step map as the cell and the first guess y_k = y0 (as paraseq.odeint), so the failure
    policies and the implicit gradients (to y0 on rank 0, t and func's parameters: sum the
    parameter gradients over the ranks) are its. Not distributed: ``options`` (substeps,
    windows) and the per-step scheme check of paraseq.odeint.
    """
    comm = Comm(group, "odeint", y0.device if isinstance(y0, Tensor) else torch.device("cpu"))
    error = None
    try:
        if solver not in SOLVERS:
            raise ValueError(f"paraseq.distributed.odeint: solver must be one of "
                             f"{', '.join(repr(s) for s in SOLVERS)}; got {solver!r}")
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise ValueError(f"paraseq.distributed.odeint: t must be this rank's 1-D slice of "
                             f"the grid; got {getattr(t, 'shape', type(t).__name__)}")
        if comm.rank == 0 and t.numel() == 0:
            raise ValueError("paraseq.distributed.odeint: rank 0's slice of t must hold t[0] "
                             "(it is empty)")
        # paraseq.odeint's own checks, on this rank's slice (a lone point stands for itself)
        _check(func, y0, t if t.numel() else y0.new_zeros(1), method, tol, max_iter,
               on_failure)
        t = t.to(y0.dtype)  # paraseq.odeint's (torchdiffeq's) rule: the solve runs in y0's dtype
    except Exception as exc:
        error = exc
    # every rank's first and last time: the steps that cross rank boundaries
    n = t.numel() if error is None else 0
    payload = None if error is not None else torch.stack([
        t.new_tensor(float(n)), t[0] if n else t.new_zeros(()), t[-1] if n else t.new_zeros(())
    ]).detach().double()
    rows = comm.gather(payload, 3, torch.float64, error, "the grid exchange")
    prev = None
    for r in range(comm.rank - 1, -1, -1):
        if rows[r, 0] > 0:
            prev = rows[r, 2]
            break
    batch, D = y0.shape[:-1], y0.shape[-1]
    B = math.prod(batch)
    if comm.rank == 0:
        pairs = torch.stack([t[:-1], t[1:]], dim=-1)  # (T_0 - 1, 2)
    else:
        tt = torch.cat([prev.to(t).reshape(1), t]) if n else t[:0]
        pairs = torch.stack([tt[:-1], tt[1:]], dim=-1) if n else t.new_zeros(0, 2)
    fld = VectorField(func, batch, D, "ode", "paraseq.distributed.odeint")
    tol = float(tol if tol is not None else DEFAULT_TOL[y0.dtype])
    scheme = RungeKutta(SCHEMES[method], fld, y0.dtype, y0.device)
    newton_tol = max(tol * 1e-3, 10 * torch.finfo(y0.dtype).eps)
    cell = StepMap(scheme, B, newton_tol, NEWTON_MAX_ITER)
    inputs = pairs.expand(*batch, pairs.shape[0], 2)  # (..., S_r, 2)
    S = pairs.shape[0]
    init = y0.detach().unsqueeze(-2).expand(*batch, S, D) if solver != "sequential" else None
    Y, info = solve_recurrence(cell, inputs, y0, group=group, method=solver, tol=tol,
                               max_iter=max_iter, jacobian="analytic", on_failure=on_failure,
                               init=init, return_info=True)
    out = Y.movedim(-2, 0)  # (S_r, ..., D)
    if comm.rank == 0:
        out = torch.cat([y0.unsqueeze(0), out], dim=0)  # (T_0, ..., D)
    return (out, info) if return_info else out


def _check(func, y0, t, method, tol, max_iter, on_failure) -> None:
    """paraseq.odeint's checks of its arguments, on this rank's slice of the grid."""
    name = "paraseq.distributed.odeint"
    if not callable(func):
        raise TypeError(f"{name}: func must be callable (a function or nn.Module); got "
                        f"{type(func).__name__}")
    if not isinstance(y0, Tensor) or y0.dim() < 1:
        raise TypeError(f"{name}: y0 must be a torch.Tensor of shape (..., D); got "
                        f"{getattr(y0, 'shape', type(y0).__name__)}")
    if y0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: y0 must be float32 or float64 (the local Newton solves use "
                        f"LAPACK); got {y0.dtype}")
    _times(name, t, y0)
    if method not in SCHEMES:
        raise ValueError(f"{name}: unknown method {method!r}; valid: "
                         + ", ".join(repr(m) for m in SCHEMES))
    _scalars(name, None, tol, max_iter, on_failure, 0.0, 0.0, y0)
