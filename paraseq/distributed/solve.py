"""``paraseq.distributed.solve_recurrence``: h_t = cell(x_t, h_{t-1}) with time split across ranks.

Shape letters: ``...`` batch dims (the same on every rank), B their product, T_r this rank's
time steps, n input size, D state size, P ranks.

One iteration (newton, quasi_newton, picard, jacobi) on every rank at once:
1. local work: f and the method's A at this rank's rows, Hp = shift(H, h_in), where h_in
   is the previous rank's last state of the current iterate; the local residual;
2. the distributed scan of h_t = A_t h_{t-1} + (f_t - A_t h^(k)_{t-1}) (``dist_scan``),
   whose one all-gather also carries every rank's residual: so every rank sees the same
   global residual (the max), stops at the same iteration, and gets the next iterate's h_in
   (the scan's carry-in) without another exchange.
The pieces are paraseq.solve's (FlatCell, the linearisations, the residual, the clipping of
iterates); what is distributed is the scan, the residual and the boundary states.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..result import ConvergenceError, SolveInfo
from ..solve.api import (
    DEFAULT_MAX_ITER,
    _as_batch_state,
    _check_args,
    _check_state_against_cell,
    _default_init,
    _default_state,
    _work_dtype_and_tol,
)
from ..solve.cell import FlatCell, State, StateLayout, blocks_to_dense
from ..solve.iterate import (
    _lin,
    _sanitize,
    evaluate,
    first_failure,
    residual_map,
    sequential,
    shift,
)
from ..solve.methods import METHODS, resolve_jacobian
from ._comm import Comm
from .scan import dist_scan

__all__ = ["solve_recurrence"]

DISTRIBUTED_METHODS = ("sequential", "newton", "quasi_newton", "picard", "jacobi")
PATIENCE = 8  # as paraseq.solve's loop: stop after 8 iterations without halving the residual


def _describe(f: dict) -> str:
    return (f"batch dims {f['batch']}, input size n = {f['n']}, state sizes {f['sizes']}, "
            f"dtype {f['dtype']}, method {METHODS_CODE[f['method']]!r}, "
            f"{'with' if f['grad'] else 'without'} gradients, init "
            f"{'given' if f['init'] else 'None'}")


METHODS_CODE = ("auto", *DISTRIBUTED_METHODS)


def _boundary(comm: Comm, H: Tensor | None, h_first: Tensor, error: BaseException | None,
              what: str) -> Tensor:
    """The state before this rank's chunk: the last state of the nearest earlier rank with a
    non-empty chunk, or ``h_first`` (h0, read on rank 0) when there is none. (B, D)."""
    B, D = h_first.shape
    payload = None
    if error is None:
        nonempty = H is not None and H.shape[1] > 0
        last = H[:, -1] if nonempty else h_first.new_zeros(B, D)
        payload = torch.cat([h_first.new_tensor([1.0 if nonempty else 0.0]), last.reshape(-1)])
    rows = comm.gather(payload, 1 + B * D, h_first.dtype, error, what).to(h_first.device)
    for r in range(comm.rank - 1, -1, -1):
        if rows[r, 0] != 0:
            return rows[r, 1:].reshape(B, D)
    return h_first  # no earlier rank holds a step: the state before the sequence


def _sequential_across(comm: Comm, fc: FlatCell, X: Tensor, start: Tensor | None, t0: int,
                       H: Tensor | None, from_rank: int, cell_dtype: torch.dtype,
                       h0_all: Tensor) -> Tensor:
    """Finish sequentially, rank after rank from ``from_rank`` (which restarts at its step
    ``t0`` from ``start``): each rank waits for the end state of the one before it."""
    B, D = h0_all.shape
    carry = None
    out = H
    for j in range(from_rank, comm.size):
        error = None
        payload = None
        if comm.rank == j:
            try:
                if j == from_rank:
                    s = start
                    keep = H[:, :t0] if H is not None else X.new_zeros(B, 0, D)
                    rest = sequential(fc, X[:, t0:], s, cell_dtype)
                else:
                    s = carry if carry is not None else h0_all
                    keep = X.new_zeros(B, 0, D, dtype=h0_all.dtype)
                    rest = sequential(fc, X, s, cell_dtype)
                out = torch.cat([keep.to(h0_all.dtype), rest.to(h0_all.dtype)], dim=1)
                payload = out[:, -1] if out.shape[1] else s
            except Exception as exc:
                error = exc
        rows = comm.gather(payload, B * D, h0_all.dtype, error, "the sequential finish")
        carry = rows[j].reshape(B, D).to(h0_all.device)
    return out


def solve_recurrence(
    cell: Callable,
    inputs: Tensor,
    h0: State | None = None,
    *,
    group=None,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    jacobian: str = "auto",
    on_failure: str = "fallback",
    init: State | None = None,
    return_info: bool = False,
):
    """``paraseq.solve_recurrence`` over a sequence whose time dim is split across the ranks.

    Every rank of ``group`` (default: the whole world) calls it at once with the same cell
    (the same parameters) and its own consecutive slice of the inputs, (..., T_r, n), in rank
    order; slices may differ in length and may be empty. Returns this rank's slice of the
    states, (..., T_r, D) (a tuple for tuple states), equal to the single-process
    ``paraseq.solve_recurrence`` over the concatenated inputs to the solver's tolerance, after
    the same number of iterations.

    h0: the state before the whole sequence, read on rank 0 (others may pass the same or None).
    method: ``"newton"``, ``"quasi_newton"``, ``"picard"``, ``"jacobi"``, ``"sequential"``
    (rank after rank: the reference, no parallelism) or ``"auto"`` (quasi_newton for a cell
    with a diagonal Jacobian, else newton). damped_newton is not distributed.
    tol, max_iter, jacobian, on_failure: as ``paraseq.solve_recurrence``. The residual that
    stops the iteration is the max over every rank, so every rank stops at the same
    iteration. ``on_failure="fallback"`` keeps every step up to the first one (over all ranks)
    whose residual is above tol and finishes sequentially from there, rank after rank;
    ``"raise"`` raises ``ConvergenceError`` on every rank; ``"warn"`` warns on every rank.
    init: this rank's slice of a first guess (..., T_r, D); default h_t = cell(x_t, 0).

    Gradients (to the inputs, h0 on rank 0, and the cell's parameters) are the exact implicit
    ones: the adjoint lambda_t = g_t + J_{t+1}^T lambda_{t+1} is one distributed reverse scan.
    Every rank must run the backward (each rank's loss reaches its own slice); parameter
    gradients are then per rank, and their sum over ranks (an all-reduce, as DDP does) is the
    single-process gradient.

    Cost per iteration: the local linearisation of T_r steps, two local scans (one on rank 0),
    one all-gather of O(B D) bytes per rank (O(B D^2) for newton), independent of T.
    A rank whose cell raises makes every rank raise (``PeerError`` on the others), at the next
    exchange; inputs whose batch dims, sizes or dtype differ across ranks raise ValueError
    naming the rank.
    """
    H, info, _ = _solve(cell, inputs, h0, group=group, method=method, tol=tol,
                        max_iter=max_iter, jacobian=jacobian, on_failure=on_failure, init=init)
    return (H, info) if return_info else H


def _solve(cell, inputs, h0, *, group, method, tol, max_iter, jacobian, on_failure, init=None):
    device = inputs.device if isinstance(inputs, Tensor) else torch.device("cpu")
    comm = Comm(group, "solve_recurrence", device)
    error = None
    fields = {"batch": (), "n": 0, "sizes": (), "dtype": torch.float32, "method": 0,
              "grad": False, "init": False}
    T = 0
    try:
        _check_args(cell, inputs, method, tol, max_iter, jacobian, on_failure, "implicit")
        if method not in METHODS_CODE:
            raise ValueError(f"paraseq.distributed.solve_recurrence: method={method!r} is not "
                             f"distributed; valid: "
                             + ", ".join(repr(m) for m in METHODS_CODE))
        T, n = inputs.shape[-2], inputs.shape[-1]
        batch = inputs.shape[:-2]
        if h0 is None:
            h0 = _default_state(cell, batch, inputs)
        layout = StateLayout.of(h0)
        _check_state_against_cell(cell, layout)
        if init is not None:
            init = _as_batch_state(init, layout, batch, "init", inputs, time=T)
        grad = torch.is_grad_enabled() and (
            inputs.requires_grad or layout.flatten(h0).requires_grad
            or any(p.requires_grad for p in getattr(cell, "parameters", lambda: ())()))
        fields = {"batch": tuple(batch), "n": n, "sizes": layout.sizes, "dtype": inputs.dtype,
                  "method": METHODS_CODE.index(method), "grad": bool(grad),
                  "init": init is not None}
    except Exception as exc:
        error = exc
    lengths = comm.check_same(fields, _describe, error, lengths=T)
    B = math.prod(batch)
    fc = FlatCell(cell, layout)
    D = layout.D
    cell_dtype = inputs.dtype
    work_dtype, tol = _work_dtype_and_tol(inputs.dtype, tol)
    X = inputs.reshape(B, T, n)  # (B, T, n)
    T_all = sum(lengths)
    if method == "auto":
        method = "quasi_newton" if fc.diag_exact or (fc.has_diag and not fc.has_full) \
            else "newton"
    info = SolveInfo(method=method, tol=tol)
    # h0 as rank 0 holds it (its copy carries the gradient); the others get its value
    error = None
    h0_flat = None
    try:
        h0_flat = _as_batch_state(h0, layout, batch, "h0", inputs).to(work_dtype)  # (B, D)
    except Exception as exc:
        error = exc
    rows = comm.gather(None if h0_flat is None else h0_flat.detach(), B * D, work_dtype, error,
                       "the h0 exchange")
    h0_all = rows[0].reshape(B, D).to(device)  # (B, D): rank 0's h0, on every rank

    def finish(H: Tensor):
        states = layout.unflatten(H.to(inputs.dtype).reshape(*batch, T, D))
        return states, info, comm

    if T_all == 0:
        return finish(h0_all.new_zeros(B, 0, D))
    h_first = h0_flat if comm.rank == 0 else h0_all
    if method == "sequential":
        with torch.no_grad():
            H = _sequential_across(comm, fc, X, h_first.detach(), 0, None, 0, cell_dtype,
                                   h0_all)
        info.converged = True
    else:
        H = _iterate(comm, fc, method, jacobian, X, h_first.detach(), h0_all, lengths,
                     tol, max_iter, on_failure, cell_dtype, work_dtype, info, init)
    # the solution's boundary states (the actual last states, after any fallback), one
    # evaluation at the solution (the reported residual; the implicit gradient's graph)
    h_in = _boundary(comm, H, h0_all, None, "the boundary exchange")
    error = None
    h_in = h_first if comm.rank == 0 else h_in.detach()
    try:
        if T:
            F = evaluate(fc, X, shift(H.to(cell_dtype), h_in.to(cell_dtype))[:, :T])
        else:  # no rows: F only joins the graph, so that this rank runs the adjoint too
            F = X.new_zeros(B, 0, D)
            if fields["grad"]:  # zero gradients (not None) for the parameters and the inputs
                for t in (X, h_in, *getattr(cell, "parameters", lambda: ())()):
                    if t.requires_grad:
                        F = F + 0 * t.sum()
                F.requires_grad_(True) if not F.requires_grad else None
        local_r = float(residual_map(H, F.detach().to(work_dtype)).max()) if H.numel() else 0.0
    except Exception as exc:
        error, local_r, F = exc, 0.0, None
    r_rows = comm.gather(torch.tensor([local_r], dtype=torch.float64), 1, torch.float64, error,
                         "the final residual")
    info.residual = float("nan") if bool(r_rows.isnan().any()) else float(r_rows.max())
    if method == "sequential":
        info.converged = True
        info.residual = 0.0 if math.isfinite(info.residual) else info.residual
    else:
        info.converged = info.residual <= tol
    if F.requires_grad:
        adj = _Adjoint(comm, fc, X, shift(H, h_in.to(H.dtype))[:, :T].detach(), cell_dtype)
        H = _Implicit.apply(F, H, adj)
    return finish(H)


def _coefficients(method: str, F: Tensor, A: Tensor | None, Hp: Tensor
                  ) -> tuple[Tensor, Tensor, bool]:
    """(a, b, dense) of the linear recurrence one iteration solves."""
    if method == "jacobi":  # h = f(x, shift(h)): a zero coefficient, the scan only shifts
        return torch.zeros_like(F), F, False
    if method == "picard":
        return torch.ones_like(F), F - Hp, False
    if A.dim() == 5:  # diagonal blocks -> the dense matrix (the same Jacobian)
        A = blocks_to_dense(A)
    if A.dim() == 4:
        return A, F - torch.matmul(A, Hp.unsqueeze(-1)).squeeze(-1), True
    return A, F - A * Hp, False


def _iterate(comm, fc, method, jacobian, X, h_first, h0_all, lengths, tol, max_iter,
             on_failure, cell_dtype, work_dtype, info, init=None) -> Tensor:
    B, T = X.shape[:2]
    D = h0_all.shape[-1]
    T_all = sum(lengths)
    m = METHODS[method]
    source = resolve_jacobian(m, jacobian, fc)
    info.jacobian = source
    cap = min(T_all, max_iter if max_iter is not None else DEFAULT_MAX_ITER[method])
    dense = m.structure == "dense"
    error = None
    H = None
    with torch.no_grad():
        try:
            if init is not None:
                H = init.detach().to(work_dtype).clone()  # (B, T, D)
            else:
                H = _default_init(fc, X, D, cell_dtype).to(work_dtype) if T else \
                    X.new_zeros(B, 0, D, dtype=work_dtype)  # (B, T, D)
        except Exception as exc:
            error = exc
        h_in = _boundary(comm, H, h0_all, error, "the first guess")
        if comm.rank == 0:
            h_in = h_first
        best, since_best, k = float("inf"), 0, 0
        F = None
        while True:
            error = None
            a = b = None
            local_r = 0.0
            try:
                Hp = shift(H, h_in)[:, :T]  # (B, T, D)
                if T:
                    F, A = _lin(fc, m, source, X, Hp, cell_dtype, 8, None)
                else:  # an empty chunk: no rows to evaluate
                    F, A = H, H.new_zeros(B, 0, D, D) if dense else H
                local_r = float(residual_map(H, F).max()) if H.numel() else 0.0
                a, b, dense_here = _coefficients(method, F, A, Hp)
                if dense_here != dense:
                    raise AssertionError("the linearisation's structure is not the method's")
            except Exception as exc:
                error = exc
            x, c, extras = dist_scan(comm, a, b, h_first, dense, False, torch.Size([B]),
                                     extra=torch.tensor([local_r], dtype=work_dtype),
                                     error=error, what=f"iteration {k}",
                                     spec=(D, work_dtype, X.device))
            r = float("nan") if bool(extras.isnan().any()) else float(extras.max())
            info.residuals.append(r)
            if r <= tol:
                info.iterations = k
                return H
            if r < 0.5 * best:
                best, since_best = r, 0
            else:
                since_best += 1
            if k >= cap or since_best >= PATIENCE:
                break
            H = _sanitize(x)
            h_in = _sanitize(c) if comm.rank != 0 else h_first
            k += 1
        info.iterations = k
        if on_failure == "raise":
            info.residual = r
            raise ConvergenceError(
                f"paraseq.distributed.solve_recurrence: method={method!r} stopped after {k} "
                f"iterations with residual {r:.3e} > tol {tol:.1e} (the max over "
                f"{comm.size} ranks); use on_failure='fallback' to finish sequentially from "
                f"the first unconverged step, or raise max_iter", k, r, info)
        if on_failure == "warn":
            warnings.warn(f"paraseq.distributed.solve_recurrence: method={method!r} did not "
                          f"converge in {k} iterations (residual {r:.3e} > tol {tol:.1e}); "
                          f"returning the last iterate", RuntimeWarning, stacklevel=4)
            return H
        # fallback: the first failing step over all ranks, then sequentially from there
        t0 = first_failure(residual_map(H, F), tol) if T else 0
        rows = comm.gather(torch.tensor([float(t0 if t0 < T else -1)]), 1, torch.float64,
                           None, "the fallback")
        bad = [r for r in range(comm.size) if rows[r, 0] >= 0]
        q = bad[0]
        tq = int(rows[q, 0])
        info.fell_back = True
        info.fallback_from = sum(lengths[:q]) + tq
        start = None
        if comm.rank == q:
            start = H[:, tq - 1] if tq > 0 else h_in
        return _sequential_across(comm, fc, X, start, tq, H, q, cell_dtype, h0_all) \
            if comm.rank >= q else _sequential_tail_wait(comm, q, H, h0_all)


def _sequential_tail_wait(comm: Comm, q: int, H: Tensor, h0_all: Tensor) -> Tensor:
    """Ranks before the failing one keep their states and join the exchanges of the ranks
    after them (each exchange is a collective of the whole group)."""
    B, D = h0_all.shape
    for _ in range(q, comm.size):
        comm.gather(None, B * D, h0_all.dtype, None, "the sequential finish")
    return H


class _Adjoint:
    """lambda_t = g_t + J_{t+1}^T lambda_{t+1} across ranks, with J the true Jacobian at the
    solution: for nu_t = J_t^T lambda_t, nu_t = J_t^T g_t + J_t^T nu_{t+1}, a distributed
    reverse scan of this rank's own Jacobians; then lambda_t = g_t + nu_{t+1}."""

    def __init__(self, comm: Comm, fc: FlatCell, X: Tensor, Hp: Tensor, cell_dtype):
        self.comm, self.fc, self.X, self.Hp, self.cell_dtype = comm, fc, X, Hp, cell_dtype

    def __call__(self, g: Tensor) -> Tensor:
        fc, X, Hp = self.fc, self.X, self.Hp
        B, T, D = Hp.shape
        g = g.to(Hp.dtype)
        error = a = b = None
        dense = not fc.diag_exact
        try:
            with torch.no_grad():
                rows_x = X.reshape(B * T, X.shape[-1])
                rows_h = Hp.reshape(B * T, D).to(self.cell_dtype)
                if fc.diag_exact:
                    res = fc.analytic_diag(rows_x, rows_h) if T else None
                    JT = (res if res is not None else fc.autograd_diag(rows_x, rows_h))[1] \
                        if T else Hp.new_zeros(0, D)
                    a = JT.reshape(B, T, D).to(Hp.dtype)
                    b = a * g
                else:
                    res = fc.analytic_blocks(rows_x, rows_h) if T else None
                    if res is not None:
                        J = blocks_to_dense(res[1])
                    else:
                        res = fc.analytic_full(rows_x, rows_h) if T else None
                        J = (res if res is not None else fc.autograd_full(rows_x, rows_h))[1] \
                            if T else Hp.new_zeros(0, D, D)
                    a = J.reshape(B, T, D, D).transpose(-1, -2).to(Hp.dtype)  # J^T
                    b = torch.matmul(a, g.unsqueeze(-1)).squeeze(-1)
        except Exception as exc:
            error = exc
        with torch.no_grad():
            nu, nu_in, _ = dist_scan(self.comm, a, b, None, dense, True, torch.Size([B]),
                                     error=error, what="the adjoint scan",
                                     spec=(D, Hp.dtype, Hp.device))
        return g + torch.cat([nu[:, 1:], nu_in.unsqueeze(1)], dim=1)[:, :T]


class _Implicit(torch.autograd.Function):
    """H with the distributed adjoint as its backward, handed to F = f(x, shift(H))."""

    @staticmethod
    def forward(ctx, F: Tensor, H: Tensor, adjoint: _Adjoint) -> Tensor:
        ctx.adjoint = adjoint
        ctx.f_dtype = F.dtype
        return H.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        return ctx.adjoint(g).to(ctx.f_dtype), None, None
