"""``odeint`` and ``odeint_implicit``: initial value problems on a time grid, parallel in time.

Shape letters: T grid points (``len(t)``), ``...`` y0's batch dims (independent systems), B
their product, D the state size, S implicit steps solved (``(T - 1) * substeps``).

An implicit one-step scheme on the grid defines a recurrence y_k = Phi((t_{k-1}, t_k), y_{k-1})
(``paraseq.ode.step``), and ``solve_recurrence`` solves it: Newton over the whole grid is then
a dense linear scan per iteration (DEER's parallel-in-time ODE solve), with the fallback, the
failure policies and the adjoint gradient of ``solve_recurrence``. After the solve every step is
checked against the scheme itself: a result is returned only if each step satisfies the
scheme's equations to ``tol`` (or with a warning, under ``on_failure="warn"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..solve import ConvergenceError, solve_recurrence
from ..solve.api import DEFAULT_TOL, ON_FAILURE
from .field import VectorField
from .schemes import SCHEMES, BackwardEulerDAE, RungeKutta
from .step import StepMap

SOLVERS = ("newton", "quasi_newton", "damped_newton", "picard", "sequential", "auto")
"""``solver`` names: the ``solve_recurrence`` method that solves the scheme over the grid
(``"sequential"`` steps it in time: the reference); ``"auto"`` picks (``choose_solver``)."""

OPTIONS = ("substeps", "window")
"""Keys ``options`` accepts: ``substeps`` (int >= 1, default 1): steps of the scheme between
consecutive output times, on an even sub-grid; ``window`` (int >= 1, default: the whole grid):
steps in the first parallel solve (``_solve_grid``), for problems known to be chaotic."""

NEWTON_MAX_ITER = 12
"""Cap on the Newton iterations of each step's local equations (per cell call)."""


@dataclass
class OdeInfo:
    """What an ``odeint`` call did.

    ``residual`` is the scheme residual: over all steps, the larger of |y_k - Phi(y_{k-1})| /
    (1 + |Phi|) and the last Newton correction of Phi's local solve, both scaled as
    ``solve_recurrence``'s residual; ``converged`` means it is <= ``tol`` at every step
    (``step_residuals``, (S,)). ``iterations`` and ``residuals`` are the parallel solver's
    iterations over the grid, summed over its ``windows``; ``fell_back`` says the first window
    did not converge and ``fallback_from`` where (see ``_solve_grid``); ``sequential_steps``
    counts steps the fallback stepped one by one. ``newton_iterations`` counts the local Newton
    iterations summed over the step-map calls (``step_calls``); ``solve_info`` is the last
    window's ``SolveInfo``."""

    solver: str
    method: str
    steps: int = 0
    substeps: int = 1
    iterations: int = 0
    converged: bool = False
    residual: float = math.nan
    tol: float = math.nan
    fell_back: bool = False
    fallback_from: int | None = None
    windows: int = 0
    sequential_steps: int = 0
    step_calls: int = 0
    newton_iterations: int = 0
    step_residuals: Tensor | None = None  # (S,) the scheme residual of each step
    residuals: list[float] = field(default_factory=list)
    solve_info: object = None


def choose_solver(S: int, B: int, D: int, device: torch.device) -> str:
    """The rule behind ``solver="auto"``.

    A step of the sequential loop costs a local Newton solve (two to four evaluations of func
    and its Jacobian, each a few Python-level calls), so the loop's cost per step is high and
    fixed, while a Newton iteration over the grid does the same work on all S steps in one
    batched call. ``"sequential"`` for S <= 16 steps, or on a CPU when B D^2 > 2048 (the dense
    scan and the batched (D, D) solves then outweigh the loop's overhead); else ``"newton"``.
    """
    if S <= 16:
        return "sequential"
    if device.type == "cpu" and B * D * D > 2048:
        return "sequential"
    return "newton"


def _check(name: str, func: Callable, y0: object, t: object, method: str, methods: tuple,
           solver: str, tol, max_iter, on_failure: str, options) -> tuple[int, int | None]:
    if not callable(func):
        raise TypeError(f"{name}: func must be callable (a function or nn.Module); got "
                        f"{type(func).__name__}")
    if not isinstance(y0, Tensor):
        raise TypeError(f"{name}: y0 must be a torch.Tensor of shape (..., D); got "
                        f"{type(y0).__name__}")
    if y0.dim() < 1:
        raise ValueError(f"{name}: y0 must have a state dim, shape (..., D); got a 0-d tensor "
                         f"(for a scalar ODE pass y0.reshape(1))")
    if y0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: y0 must be float32 or float64 (the local Newton solves use "
                        f"LAPACK); got {y0.dtype}")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: t must be a 1-D torch.Tensor of times; got "
                        f"{type(t).__name__}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: t must be a 1-D tensor of at least one time, (T,); got "
                         f"shape {tuple(t.shape)}")
    if t.device != y0.device:
        raise ValueError(f"{name}: t is on {t.device} but y0 is on {y0.device}; put both on "
                         f"one device, e.g. t.to(y0.device)")
    if t.dtype != y0.dtype:
        raise TypeError(f"{name}: t has dtype {t.dtype} but y0 has {y0.dtype}; use one "
                        f"floating dtype for both, e.g. t.to(y0.dtype)")
    if not bool(torch.isfinite(t).all()) or not bool(torch.isfinite(y0).all()):
        which = "t" if not bool(torch.isfinite(t).all()) else "y0"
        raise ValueError(f"{name}: {which} contains nan or inf")
    if t.numel() > 1:
        t = t.detach()
        dt = t[1:] - t[:-1]  # (T-1,)
        sign = 1 if float(dt[0]) > 0 else -1
        bad = torch.nonzero(~(dt * sign > 0))
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{name}: t must be strictly increasing or strictly decreasing; "
                             f"t[{i}] = {float(t[i])!r}, t[{i + 1}] = {float(t[i + 1])!r} "
                             f"break the order set by t[0], t[1] (sort t and drop repeats)")
    if method not in methods:
        raise ValueError(f"{name}: unknown method {method!r}; valid: "
                         + ", ".join(repr(m) for m in methods))
    if solver not in SOLVERS:
        raise ValueError(f"{name}: unknown solver {solver!r}; valid: "
                         + ", ".join(repr(s) for s in SOLVERS))
    if on_failure not in ON_FAILURE:
        raise ValueError(f"{name}: on_failure must be one of "
                         f"{', '.join(repr(o) for o in ON_FAILURE)}; got {on_failure!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not math.isfinite(tol) or tol <= 0):
        raise ValueError(f"{name}: tol must be a positive finite number; got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        raise ValueError(f"{name}: max_iter must be an int >= 1; got {max_iter!r}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"{name}: options must be a dict or None; got {type(options).__name__}")
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
                         f"valid: " + ", ".join(repr(k) for k in OPTIONS))
    for key in OPTIONS:
        v = options.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: options[{key!r}] must be an int >= 1; got {v!r}")
    return options.get("substeps", 1), options.get("window")


def _grid(t: Tensor, k: int) -> Tensor:
    """The step grid: t refined k times evenly, (S + 1,) with S = (T - 1) k."""
    if k == 1:
        return t
    frac = torch.arange(k, dtype=t.dtype, device=t.device) / k  # (k,)
    inner = (t[:-1, None] + (t[1:] - t[:-1])[:, None] * frac).reshape(-1)  # ((T-1) k,)
    return torch.cat([inner, t[-1:]])


class _Run:
    """One odeint call's moving parts: the step map, the step grid and the bookkeeping."""

    def __init__(self, name: str, cell: StepMap, inputs: Tensor, solver: str, tol: float,
                 max_iter: int | None, on_failure: str, info: OdeInfo):
        self.name, self.cell, self.inputs, self.solver = name, cell, inputs, solver
        self.tol, self.max_iter, self.on_failure, self.info = tol, max_iter, on_failure, info
        self.batch, self.S = inputs.shape[:-2], inputs.shape[-2]
        self.B = math.prod(self.batch)

    def solve(self, s: int, e: int, h: Tensor, method: str, policy: str) -> Tensor:
        """solve_recurrence on steps [s, e) from h (..., D): (..., e - s, D)."""
        x = self.inputs[..., s:e, :].contiguous()  # (..., n, 2), contiguous: the cell's cache
        D = h.shape[-1]
        init = None if method == "sequential" else \
            h.detach().unsqueeze(-2).expand(*self.batch, e - s, D)  # y = h all along
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                Y, sinfo = solve_recurrence(self.cell, x, h, method=method, tol=self.tol,
                                            max_iter=self.max_iter, jacobian="analytic",
                                            init=init, on_failure=policy, return_info=True)
        except ConvergenceError as err:
            raise ConvergenceError(
                f"{self.name}: solver={method!r} stopped after {err.iterations} iterations on "
                f"steps {s}..{e - 1} with residual {err.residual:.3e} > tol {self.tol:.1e}; use "
                f"on_failure='fallback' (windows of converged steps, sequential where none "
                f"converge), raise max_iter, or try solver='damped_newton'", err.iterations,
                err.residual, err.info) from err
        # Whether the solve converged is read from its SolveInfo, never from warning text.
        # policy "warn" is how odeint gets the last iterate back (its converged prefix is kept
        # by _solve_grid), so solve_recurrence's own RuntimeWarning about it is replaced by
        # odeint's report (on_failure="warn") or by nothing (fallback); other warnings (the
        # user's func) pass through, except a RuntimeWarning raised during a failed solve:
        # a caught warning carries no origin to tell it from solve_recurrence's.
        failed = not sinfo.converged
        for w in caught:
            if not (failed and issubclass(w.category, RuntimeWarning)):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if failed and self.on_failure == "warn":
            warnings.warn(f"{self.name}: solver={method!r} did not converge in "
                          f"{sinfo.iterations} iterations on steps {s}..{e - 1} (residual "
                          f"{sinfo.residual:.3e} > tol {self.tol:.1e}); returning the last "
                          f"iterate", RuntimeWarning, stacklevel=4)
        info = self.info
        info.iterations += sinfo.iterations
        info.residuals.extend(sinfo.residuals)
        info.solve_info = sinfo
        self.last_x = x
        return Y

    def check(self, x: Tensor, h: Tensor, Y: Tensor) -> Tensor:
        """The scheme residual of each step of Y (..., n, D) from h: (n,)."""
        B, n, D = self.B, Y.shape[-2], Y.shape[-1]
        Yf = Y.detach().reshape(B, n, D)  # (B, n, D)
        Hp = torch.cat([h.detach().reshape(B, 1, D), Yf[:, :-1]], dim=1)  # (B, n, D)
        rows = self.cell.step_residual(x.reshape(B * n, 2), Hp.reshape(B * n, D),
                                       Yf.reshape(B * n, D))  # (B n,)
        return rows.reshape(B, n).amax(0)  # (n,)


WINDOW_MIN = 16
"""The shortest window the fallback solves in parallel; a window in which not even the first
step converges is stepped sequentially over this many steps."""


def _solve_grid(run: _Run, y0: Tensor, window: int | None) -> tuple[Tensor, Tensor]:
    """All S steps from y0: (..., S, D) and each step's scheme residual (S,).

    ``"sequential"``: the loop. Otherwise the parallel solver on a window of steps (the whole
    grid unless ``window``), every window checked against the scheme. With
    ``on_failure="fallback"`` a window that does not converge keeps its converged prefix (the
    steps before the first one whose residual is above tol) and the next window starts there,
    as long as that prefix (at least WINDOW_MIN); a window that converges doubles the next
    one. So on a contracting problem one parallel solve does everything, and on a chaotic one
    the windows settle at the horizon the parallel solver can reach (Lorenz: a few hundred
    steps). A window without a single converged step is stepped sequentially.

    Why not ``solve_recurrence``'s own fallback (it is called with ``"warn"`` here and its
    iterate judged by this loop): that fallback restarts the parallel solve at most 3 times
    and only when the converged prefix is at least a quarter of the segment, then finishes
    everything left by the sequential loop. On a chaotic grid the prefix Newton reaches is a
    few hundred steps whatever the length, so that would step almost the whole grid one by
    one (a local Newton solve per step); the windows here keep every part parallel. They also
    accept a step only by the scheme's own residual (``check``: the match to Phi and the
    local Newton correction), not only the fixed-point residual, and bound memory by the
    window."""
    info, S, tol = run.info, run.S, run.tol
    if run.solver == "sequential":
        Y = run.solve(0, S, y0, "sequential", "raise")
        return Y, run.check(run.last_x, y0, Y)
    policy = "warn" if run.on_failure == "fallback" else run.on_failure
    W = S if window is None else min(window, S)
    s, h = 0, y0
    parts: list[Tensor] = []
    checks: list[Tensor] = []
    while s < S:
        e = min(S, s + W)
        Y = run.solve(s, e, h, run.solver, policy)
        r = run.check(run.last_x, h, Y)  # (e - s,)
        info.windows += 1
        bad = torch.nonzero(~(r <= tol))
        n = int(bad[0]) if bad.numel() else e - s
        if n == e - s or run.on_failure != "fallback":
            n = e - s
            W = min(S, 2 * W)
        else:
            if not info.fell_back:
                info.fell_back, info.fallback_from = True, s + n
            W = max(WINDOW_MIN, n)
            if n == 0:  # not one step converged: step sequentially
                e = min(S, s + WINDOW_MIN)
                Y = run.solve(s, e, h, "sequential", "raise")
                r = run.check(run.last_x, h, Y)
                info.sequential_steps += e - s
                n = e - s
                if not bool(r[0] <= tol):  # the local equations themselves fail: report
                    parts.append(Y)
                    checks.append(r)
                    break
        parts.append(Y[..., :n, :])
        checks.append(r[:n])
        h = Y[..., n - 1, :]
        s += n
    return torch.cat(parts, dim=-2), torch.cat(checks)


def _integrate(name: str, func: Callable, y0: Tensor, t: Tensor, *, method: str,
               signature: str, solver: str, tol, max_iter, on_failure: str, return_info: bool,
               options) -> Tensor | tuple[Tensor, OdeInfo]:
    methods = tuple(SCHEMES) if signature == "ode" else ("backward_euler",)
    k, window = _check(name, func, y0, t, method, methods, solver, tol, max_iter, on_failure,
                       options)
    batch, D = y0.shape[:-1], y0.shape[-1]
    B = math.prod(batch)
    fld = VectorField(func, batch, D, signature, name)
    with torch.no_grad():  # one plain call, so a wrong shape is reported plainly
        probe = func(t[0], y0) if signature == "ode" else func(t[0], y0, torch.zeros_like(y0))
    fld.check_output(probe, y0)
    tol = float(tol if tol is not None else DEFAULT_TOL[y0.dtype])
    T = t.shape[0]
    S = (T - 1) * k
    chosen = choose_solver(S, B, D, y0.device) if solver == "auto" else solver
    info = OdeInfo(solver=chosen, method=method, steps=S, substeps=k, tol=tol)
    if T == 1:
        info.converged, info.residual = True, 0.0
        info.step_residuals = y0.new_zeros(0)
        out = y0.unsqueeze(0).clone()  # (1, ..., D)
        return (out, info) if return_info else out

    scheme = RungeKutta(SCHEMES[method], fld, y0.dtype, y0.device) if signature == "ode" \
        else BackwardEulerDAE(fld)
    newton_tol = max(tol * 1e-3, 10 * torch.finfo(y0.dtype).eps)
    cell = StepMap(scheme, B, newton_tol, NEWTON_MAX_ITER)
    grid = _grid(t, k)  # (S + 1,)
    pairs = torch.stack([grid[:-1], grid[1:]], dim=-1)  # (S, 2)
    inputs = pairs.expand(*batch, S, 2)  # (..., S, 2)
    run = _Run(name, cell, inputs, chosen, tol, max_iter, on_failure, info)
    Y, per_step = _solve_grid(run, y0, window)  # (..., S', D), (S',); S' < S after a failure
    info.step_residuals = per_step
    info.residual = float(per_step.max())
    info.converged = info.residual <= tol and per_step.shape[0] == S
    info.step_calls, info.newton_iterations = cell.calls, cell.newton_iterations
    if not info.converged:
        bad = int(torch.nonzero(~(per_step <= tol))[0])
        grid = grid.detach()
        msg = (f"{name}: step {bad} (t = {float(grid[bad]):.6g} -> {float(grid[bad + 1]):.6g}) "
               f"does not satisfy the {method} scheme: residual {float(per_step[bad]):.3e} > "
               f"tol {tol:.1e}, after solver={chosen!r}")
        if on_failure == "warn":
            warnings.warn(msg + "; returning the last iterate", RuntimeWarning, stacklevel=3)
        else:
            raise ConvergenceError(
                msg + ". The step's local Newton solve does not converge: the step is too large "
                "for the dynamics there (stiff, fast or blowing up); refine t, pass "
                "options={'substeps': n}, or use a more stable method ('backward_euler', "
                "'radau_iia_3')", info.iterations, info.residual, info)  # type: ignore[arg-type]
    out = Y[..., k - 1::k, :].movedim(-2, 0)  # (T - 1, ..., D)
    out = torch.cat([y0.unsqueeze(0), out], dim=0)  # (T, ..., D)
    return (out, info) if return_info else out


def odeint(func: Callable, y0: Tensor, t: Tensor, *, method: str = "trapezoid",
           solver: str = "newton", tol: float | None = None, max_iter: int | None = None,
           on_failure: str = "fallback", return_info: bool = False,
           options: dict | None = None) -> Tensor | tuple[Tensor, OdeInfo]:
    """Solve dy/dt = func(t, y), y(t[0]) = y0, on the grid t, parallel in time.

    Args:
        func: ``func(t, y) -> dy/dt``, torchdiffeq's convention: t a 0-d tensor, y and the
            result shaped like y0. A function or an nn.Module (its parameters get gradients).
            It is evaluated at many time points in one call by ``torch.func.vmap``, so it must
            use torch operations only (no ``.item()``, no Python branches on t or y). The
            leading dims of y0 are independent systems that func must not mix.
        y0: (..., D), float32 or float64.
        t: (T,) strictly increasing, or strictly decreasing (integrates backwards); y0's
            dtype and device.
        method: the implicit one-step scheme on the grid: ``"backward_euler"`` (order 1),
            ``"trapezoid"`` (2), ``"implicit_midpoint"`` (2), ``"radau_iia_3"`` (3, L-stable)
            or ``"gauss_legendre_4"`` (4); see ``paraseq.ode.schemes``.
        solver: how the scheme is solved over the grid: ``"newton"`` (DEER: dense scans,
            quadratic convergence), ``"quasi_newton"`` (diagonal), ``"damped_newton"``
            (Levenberg-Marquardt), ``"picard"``, ``"sequential"`` (the scheme stepped in
            time: the reference) or ``"auto"`` (``choose_solver``). All give the same
            trajectory to ``tol``.
        tol: tolerance on the scheme residual (``OdeInfo.residual``); default by dtype, 1e-10
            float64 and 1e-5 float32 (``paraseq.solve.api.DEFAULT_TOL``).
        max_iter: cap on the iterations over the grid (``solve_recurrence``'s default if None).
        on_failure: ``"fallback"``: where the parallel solve does not converge, keep its
            converged prefix and go on from there in windows of steps, each solved in
            parallel, as long as the solver can reach (chaotic systems; see ``_solve_grid``),
            stepping sequentially only where not one step converges; the result satisfies
            the scheme at every step. ``"raise"``: ``ConvergenceError``. ``"warn"``: the last
            iterate, with a warning. If a step's own local equations cannot be solved (a step
            too large for stiff or exploding dynamics), no solver can help:
            ``ConvergenceError`` unless ``"warn"``.
        return_info: also return an ``OdeInfo``.
        options: ``{"substeps": k}``: k scheme steps between consecutive output times (an
            even sub-grid); ``{"window": n}``: the first parallel solve covers n steps instead
            of the whole grid (then 2n, 4n, ...: for problems known to be chaotic, and to bound
            memory, which grows with the steps solved at once).

    Returns:
        (T, ..., D) with ``out[0] == y0``; ``(out, info)`` with ``return_info``.

    Gradients with respect to y0, t and func's parameters (and tensors it closes over) are
    those of the discrete scheme: by ``solve_recurrence``'s adjoint (one reverse scan) for the
    parallel solvers, by autograd through the steps for ``"sequential"``.

    ``tol`` bounds each step's residual, so the parallel and the sequential trajectories may
    drift apart by up to about steps x tol (float32: 1e-5 per step), and further on chaotic
    systems; float64 keeps that drift far below the schemes' own error.
    """
    return _integrate("odeint", func, y0, t, method=method, signature="ode", solver=solver,
                      tol=tol, max_iter=max_iter, on_failure=on_failure,
                      return_info=return_info, options=options)


def odeint_implicit(func: Callable, y0: Tensor, t: Tensor, *, method: str = "backward_euler",
                    solver: str = "newton", tol: float | None = None,
                    max_iter: int | None = None, on_failure: str = "fallback",
                    return_info: bool = False, options: dict | None = None
                    ) -> Tensor | tuple[Tensor, OdeInfo]:
    """Solve the implicit DAE func(t, y, dy/dt) = 0, y(t[0]) = y0, on the grid t (DEER's form).

    ``func(t, y, dy) -> residual`` shaped like y (D equations in D unknowns; algebraic
    equations simply do not involve dy). The only method is ``"backward_euler"``: each step
    solves func(t_k, y_k, (y_k - y_{k-1}) / h) = 0 for y_k. y0 must be consistent (satisfy
    the algebraic equations). Everything else is as ``odeint``: shapes, solvers, tolerance
    (on the state: the scheme residual is the Newton correction's size, not |func|),
    failure policy, gradients, options.
    """
    return _integrate("odeint_implicit", func, y0, t, method=method, signature="dae",
                      solver=solver, tol=tol, max_iter=max_iter, on_failure=on_failure,
                      return_info=return_info, options=options)
