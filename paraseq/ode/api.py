"""``odeint`` and ``odeint_implicit``: initial value problems on a time grid, parallel in time.

Shape letters: T output times (``len(t)``), ``...`` y0's batch dims (independent systems), B
their product, D the state size, S steps solved, G = S + 1 grid points.

A one-step method on a grid is a recurrence y_k = Phi((t_{k-1}, t_k), y_{k-1}): an implicit
scheme's local solve (``paraseq.ode.step``) or an explicit Runge-Kutta step
(``paraseq.ode.explicit``), and ``solve_recurrence`` solves it over the whole grid: Newton is
then a dense linear scan per iteration (DEER's parallel-in-time ODE solve), with the fallback,
the failure policies and the adjoint gradient of ``solve_recurrence``. After the solve every
step is checked against the method itself: a result is returned only if each step satisfies it
to ``tol`` (or with a warning, under ``on_failure="warn"``).

The adaptive methods (dopri5, bosh3, fehlberg2, adaptive_heun) meet rtol/atol by refining the
grid, not by stepping: solve on a grid in parallel, estimate every step's local error at once
with the embedded pair, split the steps whose error exceeds the tolerance, solve again from the
previous solution, until every step passes (``_adaptive``).

torchdiffeq's call is accepted unchanged (``odeint(func, y0, t, *, rtol, atol, method,
options, event_fn)``, its method names, options, dtype rules, tuple and 0-d states) plus
paraseq's keywords (solver, tol, max_iter, on_failure, return_info).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..solve import ConvergenceError, solve_recurrence
from ..solve.api import DEFAULT_TOL, ON_FAILURE
from .explicit import ADAPTIVE, EXPLICIT, ExplicitStep
from .field import VectorField
from .schemes import SCHEMES, BackwardEulerDAE, RungeKutta
from .step import StepMap

SOLVERS = ("newton", "quasi_newton", "damped_newton", "picard", "sequential", "auto")
"""``solver`` names: the ``solve_recurrence`` method that solves the method over the grid
(``"sequential"`` steps it in time: the reference); ``"auto"`` picks (``choose_solver``)."""

ALIASES = {"implicit_euler": "backward_euler", "radauIIA3": "radau_iia_3",
           "radauIIA5": "radau_iia_5", "gl4": "gauss_legendre_4", "gl6": "gauss_legendre_6"}
"""torchdiffeq's names of paraseq's implicit schemes."""

UNSUPPORTED = {
    "explicit_adams": "a multistep method (its step needs past derivatives)",
    "implicit_adams": "a multistep method (its step needs past derivatives)",
    "fixed_adams": "a multistep method (its step needs past derivatives)",
    "scipy_solver": "scipy's sequential solvers",
    "dopri8": "not implemented here (its 13-stage tableau)",
    "sdirk2": "not implemented here", "trbdf2": "not implemented here",
}
"""torchdiffeq method names paraseq does not provide, and why (the error says so)."""

METHODS = (*SCHEMES, *ALIASES, *EXPLICIT)
"""Every ``method`` odeint accepts: the implicit schemes (and their torchdiffeq aliases), the
explicit fixed-grid methods and the adaptive ones; ``None`` is ``"dopri5"`` (torchdiffeq's
default)."""

GRID_OPTIONS = ("step_size", "grid_constructor", "perturb", "interp", "substeps", "window")
ADAPTIVE_OPTIONS = ("first_step", "max_num_steps", "step_t", "jump_t", "norm", "safety",
                    "max_rounds", "perturb", "window")
OPTIONS = {"grid": GRID_OPTIONS, "adaptive": ADAPTIVE_OPTIONS}
"""Keys ``options`` accepts, by kind of method. Fixed grid (implicit schemes and euler ...
rk4), torchdiffeq's: ``step_size`` (the grid t[0] + k step_size, outputs interpolated),
``grid_constructor`` (``f(func, y0, t) -> grid``, from t[0] to t[-1]), ``perturb`` (evaluate
func just inside each step: fields with jumps at grid points), ``interp`` (``"linear"`` or
``"cubic"``: how outputs between grid points are read off); paraseq's: ``substeps`` (int >= 1:
steps between consecutive output times, on an even sub-grid) and ``window`` (int >= 1: steps in
the first parallel solve, for problems known to be chaotic). Adaptive, torchdiffeq's:
``first_step``, ``max_num_steps``, ``step_t`` and ``jump_t`` (times the grid must contain),
``norm`` (of the error ratio, per step), ``safety``; paraseq's: ``max_rounds`` (refinement
rounds, default ``MAX_ROUNDS``) and ``window``."""

NEWTON_MAX_ITER = 12
"""Cap on the Newton iterations of each step's local equations (per cell call)."""

DENSE_MAX = 256
"""The default solver (``solver=None``) is ``"newton"`` up to this state size and
``"sequential"`` above it: Newton over the grid keeps a dense (D, D) Jacobian per step (a
func that mixes y0's rows makes the whole state one system, D = y0.numel())."""

MAX_ROUNDS = 40
"""Default cap on the adaptive grid's refinement rounds."""

MAX_SPLIT = 16
"""The most pieces one step is split into in one round (a step whose error is not finite)."""

GROWTH = 10.0
"""The first grid's spacing over the initial step estimate (``_initial_step`` aims well inside
the tolerance, and a stepper grows its step from there by up to 10x a step)."""

MERGE, MERGE_ROUNDS = 4, 3
"""In the first MERGE_ROUNDS rounds that refine, steps far within the tolerance are also
merged, up to MERGE of them into one (a first grid finer than needed)."""


@dataclass
class OdeInfo:
    """What an ``odeint`` call did.

    ``residual`` is the method residual: over all steps, the larger of |y_k - Phi(y_{k-1})| /
    (1 + |Phi|) and (implicit schemes) the last Newton correction of Phi's local solve, both
    scaled as ``solve_recurrence``'s residual; ``converged`` means it is <= ``tol`` at every
    step (``step_residuals``, (S,)). ``iterations`` and ``residuals`` are the parallel solver's
    iterations over the grid, summed over its ``windows`` (and the adaptive rounds);
    ``fell_back`` says the first window did not converge and ``fallback_from`` where (see
    ``_solve_grid``); ``sequential_steps`` counts steps the fallback stepped one by one.
    ``newton_iterations`` counts the local Newton iterations summed over the step-map calls
    (``step_calls``); ``solve_info`` is the last window's ``SolveInfo``.

    ``steps`` is the grid's size. Adaptive methods: ``rounds`` (grids solved),
    ``grid_sizes`` (steps of each round's grid) and ``error_ratio`` (the largest step error
    over the tolerance, <= 1 when met). ``vectorised``: func ran batched over time points by
    torch.func.vmap; False means it could not (``vmap_error`` says why: Python control flow on
    t or y, ``.item()``) and was called point by point, and ``solver=None`` then stepped in
    time. ``one_system``: y0's leading dims were not independent systems for func (it mixes
    them, or the state is a tuple or 0-d), so the whole state was one system."""

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
    step_residuals: Tensor | None = None  # (S,) the method residual of each step
    residuals: list[float] = field(default_factory=list)
    solve_info: object = None
    rounds: int = 0
    grid_sizes: list[int] = field(default_factory=list)
    error_ratio: float = math.nan
    vectorised: bool = True
    vmap_error: str | None = None
    one_system: bool = False
    grid: Tensor | None = field(default=None, repr=False)  # (G,) the final grid
    trajectory: object = field(default=None, repr=False)  # the solution on it, (G, ...)
    step: Callable | None = field(default=None, repr=False)  # (t_a, t_b, y_a) -> y_b

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


# ------------------------------------------------------------------------------ the inputs

def _method(name: str, method, signature: str) -> str:
    if signature == "dae":
        if method != "backward_euler":
            raise ValueError(f"{name}: unknown method {method!r}; valid: 'backward_euler'")
        return method
    if method is None:
        return "dopri5"
    if not isinstance(method, str):
        raise TypeError(f"{name}: method must be a string or None; got "
                        f"{type(method).__name__}")
    if method in UNSUPPORTED:
        raise ValueError(f"{name}: method {method!r} (torchdiffeq's) is not supported: "
                         f"{UNSUPPORTED[method]}; valid: " + ", ".join(repr(m) for m in METHODS))
    if method not in METHODS:
        raise ValueError(f'{name}: Invalid method "{method}". Must be one of '
                         + ", ".join(repr(m) for m in METHODS))
    return ALIASES.get(method, method)


def _kind(method: str, signature: str) -> str:
    if signature == "dae" or method in SCHEMES:
        return "implicit"
    return "adaptive" if method in ADAPTIVE else "fixed"


class _State:
    """y0 as paraseq solves it, (..., D), and the way back to the caller's structure.

    A tensor with a state dim is solved as it is, its leading dims independent systems (unless
    func mixes them: ``one_system``). A 0-d tensor, a tuple of tensors, or a tensor whose rows
    func mixes is flattened into one system (1, D) and func wrapped to see its own structure.
    """

    def __init__(self, name: str, y0: object):
        self.name = name
        if isinstance(y0, (tuple, list)):
            if not y0 or not all(isinstance(y, Tensor) for y in y0):
                raise TypeError(f"{name}: y0 must be a tensor or a non-empty tuple of tensors; "
                                f"got {type(y0).__name__} of "
                                f"{[type(y).__name__ for y in y0]}")
            dts = {y.dtype for y in y0}
            devs = {y.device for y in y0}
            if len(dts) > 1 or len(devs) > 1:
                raise TypeError(f"{name}: the tensors of a tuple y0 must share one dtype and "
                                f"device; got {sorted(map(str, dts))} on "
                                f"{sorted(map(str, devs))}")
            self.tensors = tuple(y0)
            self.tuple = True
        elif isinstance(y0, Tensor):
            self.tensors = (y0,)
            self.tuple = False
        else:
            raise TypeError(f"{name}: y0 must be a torch.Tensor (or a tuple of tensors); got "
                            f"{type(y0).__name__}")
        first = self.tensors[0]
        if first.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}: y0 must be float32 or float64 (the local solves use "
                            f"LAPACK); got {first.dtype}")
        self.shapes = [y.shape for y in self.tensors]
        self.flat = self.tuple or first.dim() == 0
        self.y = torch.cat([y.reshape(-1) for y in self.tensors]).reshape(1, -1) \
            if self.flat else first

    def make_flat(self) -> None:
        """Treat the whole state as one system (func mixes y0's leading dims)."""
        self.flat = True
        self.y = self.y.reshape(1, -1)

    def split(self, y: Tensor) -> tuple[Tensor, ...]:
        """A flat (1, D) state -> the caller's tensors."""
        out, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(y[..., i:i + n].reshape(shape))
            i += n
        return tuple(out)

    def wrap(self, func: Callable) -> Callable:
        if not self.flat:
            return func

        def flat_func(t, y):  # y (1, D)
            ys = self.split(y)
            out = func(t, ys if self.tuple else ys[0])
            outs = out if self.tuple else (out,)
            if self.tuple and (not isinstance(out, (tuple, list)) or len(out) != len(ys)):
                raise TypeError(f"{self.name}: func(t, y) must return a tuple of "
                                f"{len(ys)} tensors shaped like y0's; got "
                                f"{type(out).__name__}")
            for o, shape in zip(outs, self.shapes, strict=True):
                if not isinstance(o, Tensor) or o.shape != shape:
                    raise ValueError(f"{self.name}: func(t, y) must return "
                                     f"{'tensors' if self.tuple else 'a tensor'} shaped like "
                                     f"y0, {[tuple(s) for s in self.shapes]}; got "
                                     f"{getattr(o, 'shape', type(o).__name__)}")
            return torch.cat([o.reshape(-1) for o in outs]).reshape(1, -1)

        return flat_func

    def unflatten(self, Y: Tensor):
        """(T, ..., D) -> the caller's structure with a leading T dim."""
        if not self.flat:
            return Y
        T = Y.shape[0]
        Y = Y.reshape(T, -1)
        out, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            out.append(Y[:, i:i + n].reshape(T, *shape))
            i += n
        return tuple(out) if self.tuple else out[0]


def _times(name: str, t: object, y: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: t must be a 1-D torch.Tensor of times; got "
                        f"{type(t).__name__}")
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name}: t must be a 1-D tensor of at least one time, (T,); got "
                         f"shape {tuple(t.shape)}")
    if t.device != y.device:
        raise ValueError(f"{name}: t is on {t.device} but y0 is on {y.device}; put both on "
                         f"one device, e.g. t.to(y0.device)")
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: t must be real; got {t.dtype}")
    t = t.to(y.dtype)  # torchdiffeq's rule: the solve runs in y0's dtype
    if not bool(torch.isfinite(t).all()) or not bool(torch.isfinite(y).all()):
        which = "t" if not bool(torch.isfinite(t).all()) else "y0"
        raise ValueError(f"{name}: {which} contains nan or inf")
    _monotone(name, "t", t)
    return t


def _monotone(name: str, what: str, t: Tensor) -> None:
    if t.numel() > 1:
        t = t.detach()
        dt = t[1:] - t[:-1]  # (T-1,)
        sign = 1 if float(dt[0]) > 0 else -1
        bad = torch.nonzero(~(dt * sign > 0))
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"{name}: {what} must be strictly increasing or strictly "
                             f"decreasing; {what}[{i}] = {float(t[i])!r}, {what}[{i + 1}] = "
                             f"{float(t[i + 1])!r} break the order set by {what}[0], "
                             f"{what}[1] (sort it and drop repeats)")


def _scalars(name: str, solver, tol, max_iter, on_failure: str, rtol, atol, y: Tensor):
    if solver is not None and solver not in SOLVERS:
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
    for key, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, Tensor):
            if v.requires_grad:
                raise ValueError(f"{name}: {key} cannot require gradient")
            if not bool((v >= 0).all()) or not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name}: {key} must be finite and >= 0; got {v}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 \
                or not math.isfinite(v):
            raise ValueError(f"{name}: {key} must be a finite number >= 0 (or a tensor of "
                             f"them); got {v!r}")


def _options(name: str, options, kind: str, method: str) -> dict:
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"{name}: options must be a dict or None; got {type(options).__name__}")
    valid = ADAPTIVE_OPTIONS if kind == "adaptive" else GRID_OPTIONS
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(repr(k) for k in unknown)} for "
                         f"method {method!r}; valid: " + ", ".join(repr(k) for k in valid))
    opts = dict(options)
    for key in ("substeps", "window", "max_num_steps", "max_rounds"):
        if key in opts and opts[key] is not None:
            v = opts[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: options[{key!r}] must be an int >= 1; got {v!r}")
    for key in ("step_size", "first_step"):
        v = opts.get(key)
        if v is not None:
            f = float(v) if isinstance(v, (int, float, Tensor)) and not isinstance(v, bool) \
                else math.nan
            if not (math.isfinite(f) and f > 0):
                raise ValueError(f"{name}: options[{key!r}] must be a positive number; got "
                                 f"{v!r}")
    if opts.get("step_size") is not None and opts.get("grid_constructor") is not None:
        raise ValueError(f"{name}: step_size and grid_constructor are mutually exclusive "
                         f"arguments")
    if opts.get("substeps", 1) != 1 and (opts.get("step_size") is not None
                                          or opts.get("grid_constructor") is not None):
        raise ValueError(f"{name}: options 'substeps' refines t; it does not combine with "
                         f"'step_size' or 'grid_constructor' (which set the grid themselves)")
    if opts.get("interp", "linear") not in ("linear", "cubic"):
        raise ValueError(f"{name}: options['interp'] must be 'linear' or 'cubic'; got "
                         f"{opts['interp']!r}")
    if "safety" in opts and not (isinstance(opts["safety"], (int, float))
                                 and 0 < opts["safety"] <= 1):
        raise ValueError(f"{name}: options['safety'] must be in (0, 1]; got {opts['safety']!r}")
    for key in ("grid_constructor", "norm"):
        if opts.get(key) is not None and not callable(opts[key]):
            raise TypeError(f"{name}: options[{key!r}] must be callable; got "
                            f"{type(opts[key]).__name__}")
    if kind == "implicit" and opts.get("perturb"):
        raise ValueError(f"{name}: options['perturb'] applies to the explicit methods; the "
                         f"implicit scheme {method!r} evaluates func at its stage times")
    return opts


def _grid(t: Tensor, k: int) -> Tensor:
    """The step grid: t refined k times evenly, (S + 1,) with S = (T - 1) k."""
    if k == 1:
        return t
    frac = torch.arange(k, dtype=t.dtype, device=t.device) / k  # (k,)
    inner = (t[:-1, None] + (t[1:] - t[:-1])[:, None] * frac).reshape(-1)  # ((T-1) k,)
    return torch.cat([inner, t[-1:]])


def _step_size_grid(t: Tensor, h: float) -> Tensor:
    """t[0], t[0] + h, ... up to t[-1] (the last point is t[-1]), in t's direction."""
    span = float(t[-1].detach() - t[0].detach())
    n = max(2, math.ceil(abs(span) / h + 1))
    if (n - 2) * h >= abs(span):  # rounding put a point on or past the end
        n -= 1
    k = torch.arange(n - 1, dtype=t.dtype, device=t.device)
    inner = t[0] + math.copysign(h, span) * k  # (n - 1,)
    return torch.cat([inner, t[-1:]])


def _interp(grid: Tensor, Y: Tensor, t: Tensor, how: str = "linear", F: Tensor | None = None
            ) -> Tensor:
    """Y (G, ..., D) on grid (G,) read off at t (T,): (T, ..., D); cubic Hermite with the
    derivatives F (G, ..., D), else linear."""
    sign = 1.0 if float(grid[-1] - grid[0]) >= 0 else -1.0
    g, q = (sign * grid).detach(), (sign * t).detach()
    j = (torch.searchsorted(g, q, right=True) - 1).clamp(0, grid.shape[0] - 2)  # (T,)
    g0, g1 = grid[j], grid[j + 1]
    h = g1 - g0
    th = ((t - g0) / h).reshape(-1, *([1] * (Y.dim() - 1)))  # (T, 1, ..)
    y0, y1 = Y[j], Y[j + 1]
    if how == "linear" or F is None:
        return y0 + th * (y1 - y0)
    hh = h.reshape(th.shape)
    h00 = (1 + 2 * th) * (1 - th) ** 2
    h10 = th * (1 - th) ** 2
    h01 = th * th * (3 - 2 * th)
    h11 = th * th * (th - 1)
    return h00 * y0 + h10 * hh * F[j] + h01 * y1 + h11 * hh * F[j + 1]


class _Run:
    """One odeint call's moving parts: the step map, the step grid and the bookkeeping."""

    def __init__(self, name: str, cell, inputs: Tensor, solver: str, tol: float,
                 max_iter: int | None, on_failure: str, info: OdeInfo):
        self.name, self.cell, self.inputs, self.solver = name, cell, inputs, solver
        self.tol, self.max_iter, self.on_failure, self.info = tol, max_iter, on_failure, info
        self.batch, self.S = inputs.shape[:-2], inputs.shape[-2]
        self.B = math.prod(self.batch)
        self.init: Tensor | None = None  # (..., S, D) a warm start (the adaptive rounds')

    def solve(self, s: int, e: int, h: Tensor, method: str, policy: str) -> Tensor:
        """solve_recurrence on steps [s, e) from h (..., D): (..., e - s, D)."""
        x = self.inputs[..., s:e, :].contiguous()  # (..., n, 2), contiguous: the cell's cache
        D = h.shape[-1]
        if method == "sequential":
            init = None
        elif self.init is not None and s == 0:
            init = self.init[..., :e, :]
        else:
            init = h.detach().unsqueeze(-2).expand(*self.batch, e - s, D)  # y = h all along
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


def _mixes_rows(fld: VectorField, t0: Tensor, y: Tensor) -> bool:
    """Whether func couples y0's leading dims (rows the solver treats as independent): a
    random cotangent through func at (t0, y0) against the row-by-row Jacobians."""
    B, D = fld.B, fld.D
    with torch.no_grad():
        _, (J,) = fld.with_jacobians(t0.reshape(1), y.detach().reshape(1, B, D))  # (1, B, D, D)
    gen = torch.Generator(device="cpu").manual_seed(0)
    u = torch.randn(B, D, generator=gen, dtype=y.dtype).to(y.device)
    with torch.enable_grad():
        yy = y.detach().clone().requires_grad_(True)
        out = fld.func(t0.detach(), yy)
        if not out.requires_grad:
            return False
        (full,) = torch.autograd.grad(out, yy, u.reshape(out.shape), allow_unused=True)
    full = torch.zeros_like(u) if full is None else full.reshape(B, D)
    rows = torch.einsum("bi,bij->bj", u, J[0])
    scale = float(full.abs().max().clamp_min(rows.abs().max()).clamp_min(1e-30))
    return float((full - rows).abs().max()) > 1e3 * torch.finfo(y.dtype).eps * scale * D


def _make_cell(kind: str, method: str, fld: VectorField, signature: str, B: int, y: Tensor,
               tol: float, perturb: bool):
    if kind == "implicit":
        scheme = RungeKutta(SCHEMES[method], fld, y.dtype, y.device) if signature == "ode" \
            else BackwardEulerDAE(fld)
        newton_tol = max(tol * 1e-3, 10 * torch.finfo(y.dtype).eps)
        return StepMap(scheme, B, newton_tol, NEWTON_MAX_ITER)
    return ExplicitStep(EXPLICIT[method], fld, B, y.dtype, y.device, perturb=perturb)


def _solve_on(name: str, cell, y: Tensor, grid: Tensor, solver: str, tol: float, max_iter,
              on_failure: str, window, info: OdeInfo, method: str,
              init: Tensor | None = None) -> Tensor:
    """The method on grid (G,) from y (..., D): (..., G, D) with y first; every step checked
    (module doc), ConvergenceError unless on_failure="warn"."""
    batch = y.shape[:-1]
    S = grid.shape[0] - 1
    pairs = torch.stack([grid[:-1], grid[1:]], dim=-1)  # (S, 2)
    inputs = pairs.expand(*batch, S, 2)  # (..., S, 2)
    run = _Run(name, cell, inputs, solver, tol, max_iter, on_failure, info)
    run.init = init
    Y, per_step = _solve_grid(run, y, window)  # (..., S', D), (S',); S' < S after a failure
    info.steps = S
    info.step_residuals = per_step
    info.residual = float(per_step.max())
    info.converged = info.residual <= tol and per_step.shape[0] == S
    info.step_calls, info.newton_iterations = cell.calls, cell.newton_iterations
    if not info.converged:
        bad = int(torch.nonzero(~(per_step <= tol))[0])
        g = grid.detach()
        word = "scheme" if method in SCHEMES else "method"
        msg = (f"{name}: step {bad} (t = {float(g[bad]):.6g} -> {float(g[bad + 1]):.6g}) "
               f"does not satisfy the {method} {word}: residual {float(per_step[bad]):.3e} > "
               f"tol {tol:.1e}, after solver={solver!r}")
        if on_failure == "warn":
            warnings.warn(msg + "; returning the last iterate", RuntimeWarning, stacklevel=4)
        else:
            raise ConvergenceError(
                msg + ". The step's local Newton solve does not converge: the step is too large "
                "for the dynamics there (stiff, fast or blowing up); refine t, pass "
                "options={'substeps': n}, or use a more stable method ('backward_euler', "
                "'radau_iia_3')", info.iterations, info.residual, info)  # type: ignore[arg-type]
    return torch.cat([y.unsqueeze(-2), Y], dim=-2)


def _rms(x: Tensor) -> Tensor:
    """Root mean square over all but the first dim: (S, ...) -> (S,)."""
    return x.reshape(x.shape[0], -1).pow(2).mean(-1).sqrt()


def _error_ratio(cell: ExplicitStep, grid: Tensor, Yall: Tensor, rtol, atol, state: _State,
                 norm: Callable | None) -> Tensor:
    """Every step's embedded error over its tolerance, (S,), in one batched evaluation:
    norm(err / (atol + rtol max(|y_prev|, |y_next|))), the RMS over the state by default
    (over each tensor of a tuple state, then the largest), as torchdiffeq measures it."""
    B, G, D = cell.B, Yall.shape[-2], Yall.shape[-1]
    S = G - 1
    with torch.no_grad():
        Yd = Yall.detach().reshape(B, G, D).transpose(0, 1)  # (G, B, D)
        tau = torch.stack([grid[:-1], grid[1:]], dim=-1).detach()  # (S, 2)
        y1, err = cell.step(tau, Yd[:-1], with_error=True)  # (S, B, D)
        y0v = Yd[:-1]
        if state.flat:
            parts = []
            for a, b, e in zip(*(_split_steps(state, v) for v in (y0v, y1, err)), strict=True):
                tol_ = _tol_like(atol, e) + _tol_like(rtol, e) * torch.maximum(a.abs(), b.abs())
                parts.append(e / tol_)
            if norm is not None:
                return _apply_norm(norm, tuple(parts) if state.tuple else parts[0])
            return torch.stack([_rms(p) for p in parts]).amax(0)
        shape = (S, *state.shapes[0])
        a, b, e = (v.reshape(shape) for v in (y0v, y1, err))
        ratio = e / (_tol_like(atol, e) + _tol_like(rtol, e) * torch.maximum(a.abs(), b.abs()))
        if norm is not None:
            return _apply_norm(norm, ratio)
        return _rms(ratio)


def _split_steps(state: _State, v: Tensor) -> list[Tensor]:
    """(S, 1, D) flat states -> each tensor of the caller's structure, (S, *shape)."""
    S = v.shape[0]
    out, i = [], 0
    for shape in state.shapes:
        n = math.prod(shape)
        out.append(v.reshape(S, -1)[:, i:i + n].reshape(S, *shape))
        i += n
    return out


def _tol_like(v, like: Tensor):
    return v.to(like.dtype) if isinstance(v, Tensor) else float(v)


def _apply_norm(norm: Callable, ratio) -> Tensor:
    """The caller's norm of each step's error ratio (a tensor or tuple with a leading S)."""
    S = (ratio[0] if isinstance(ratio, tuple) else ratio).shape[0]
    try:
        return torch.func.vmap(norm)(ratio).reshape(S)
    except RuntimeError:
        pick = (lambda k: tuple(r[k] for r in ratio)) if isinstance(ratio, tuple) \
            else (lambda k: ratio[k])
        return torch.stack([torch.as_tensor(norm(pick(k))) for k in range(S)]).reshape(S)


def _initial_step(fld: VectorField, t0: Tensor, y: Tensor, f0: Tensor, order: int, rtol,
                  atol, state: _State) -> float:
    """A first step from the scaled sizes of y0, f0 and the change of f over a trial Euler
    step (Hairer, Norsett and Wanner, Solving ODEs I, II.4): the grid's initial spacing."""
    def nrm(v):
        if state.flat:
            parts = _split_steps(state, v.reshape(1, 1, -1))
            return float(max(_rms(p.reshape(1, -1)) for p in parts))
        return float(_rms(v.reshape(1, -1)))

    with torch.no_grad():
        scale = _tol_like(atol, y) + _tol_like(rtol, y) * y.abs()
        d0, d1 = nrm(y / scale), nrm(f0 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        B, D = fld.B, fld.D
        y1 = y + h0 * f0
        f1 = fld(t0.reshape(1) + h0, y1.reshape(1, B, D)).reshape(y.shape)
        d2 = nrm((f1 - f0) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else \
            (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1)


def _adaptive(name: str, cell: ExplicitStep, y: Tensor, t: Tensor, f0: Tensor, *, rtol, atol,
              opts: dict, state: _State, solver: str, tol: float, max_iter, on_failure: str,
              info: OdeInfo) -> tuple[Tensor, Tensor, Tensor]:
    """The method on a grid refined until every step's embedded error is within rtol/atol:
    (T, ..., D) at t, the grid (G,) and the solution on it (..., G, D).

    The grid's points are (segment of t, fraction of it), so t's points are always on it and
    the grid stays differentiable in t. Round r solves the grid in parallel (from round r-1's
    solution, interpolated), takes every step's error ratio at once, and splits each step whose
    ratio exceeds 1 into ceil(ratio^(1/(p+1)) / safety) pieces (p the embedded order; 2 to
    MAX_SPLIT), up to the first step whose error is not finite (the states after it are not
    trusted). Steps only split, never merge: the initial spacing comes from
    ``_initial_step``."""
    tab = cell.tab
    td = t.detach()
    is_out = torch.ones(t.shape[0], dtype=torch.bool)  # which knots are output times
    extra = [float(v) for key in ("step_t", "jump_t") if opts.get(key) is not None
             for v in torch.as_tensor(opts[key], dtype=torch.float64).reshape(-1).tolist()]
    lo, hi = sorted((float(td[0]), float(td[-1])))
    extra = sorted({v for v in extra if lo < v < hi} - set(td.tolist()))
    if extra:  # times the grid must contain: knots like t's (never moved by a remesh)
        sign = 1.0 if float(td[-1] - td[0]) > 0 else -1.0
        knots = torch.cat([t, torch.tensor(extra, dtype=t.dtype, device=t.device)])
        order = torch.argsort(sign * knots.detach())
        t = knots[order]  # differentiable in the output times
        is_out = torch.cat([is_out, torch.zeros(len(extra), dtype=torch.bool)])[order.cpu()]
        td = t.detach()
    T = t.shape[0]
    dt = td[1:] - td[:-1]  # (T-1,)
    safety = float(opts.get("safety", 0.9))
    max_rounds = opts.get("max_rounds", MAX_ROUNDS)
    max_steps = opts.get("max_num_steps") or 2 ** 31 - 1
    first = opts.get("first_step")
    h0 = float(first) if first is not None else GROWTH * _initial_step(
        cell.field, t[0], y, f0, tab.order, rtol, atol, state)
    n = torch.ceil(dt.abs().double() / h0).clamp(min=1).long()  # (T-1,) pieces per segment
    if int(n.sum()) > max_steps:
        n = torch.ceil(n.double() * max_steps / 2 / float(n.sum())).clamp(min=1).long()
    seg = torch.repeat_interleave(torch.arange(T - 1), n)  # (S,)
    starts = torch.cumsum(n, 0) - n
    frac = (torch.arange(int(n.sum())) - starts[seg]).double() / n[seg].double()  # (S,)
    norm = opts.get("norm")
    prev_grid = prev_Y = None
    dev = t.device
    for r in range(1, max_rounds + 1):
        S = seg.shape[0]
        if S > max_steps:
            raise RuntimeError(f"{name}: max_num_steps exceeded ({S} >= {max_steps}): the "
                               f"adaptive grid needs more steps to meet rtol/atol; raise "
                               f"options['max_num_steps'] or loosen rtol/atol")
        sd, fd = seg.to(dev), frac.to(device=dev, dtype=t.dtype)
        inner = torch.where(fd == 0, t[sd], t[sd] + (t[sd + 1] - t[sd]) * fd)  # (S,)
        grid = torch.cat([inner, t[-1:]])  # (S + 1,)
        init = None
        if prev_Y is not None:
            Yp = prev_Y.movedim(-2, 0)  # (G', ..., D)
            init = _interp(prev_grid, Yp, grid.detach()[1:]).movedim(0, -2)  # (..., S, D)
        Yall = _solve_on(name, cell, y, grid, solver, tol, max_iter, on_failure,
                         opts.get("window"), info, tab.name, init)  # (..., S + 1, D)
        ratio = _error_ratio(cell, grid, Yall, rtol, atol, state, norm)  # (S,)
        info.rounds = r
        info.grid_sizes.append(S)
        fin = torch.isfinite(ratio)
        info.error_ratio = float(ratio.max()) if bool(fin.all()) else math.inf
        bad = ~(ratio <= 1)  # (S,)
        if not bool(bad.any()):
            out_idx = torch.nonzero(fd == 0).reshape(-1)  # the knots' positions but the last
            out_idx = torch.cat([out_idx, out_idx.new_tensor([S])])[is_out.to(dev)]
            out = Yall[..., out_idx, :]  # (..., T, D)
            return out.movedim(-2, 0), grid, Yall
        nf = torch.nonzero(~fin)
        if nf.numel():  # states after a non-finite error come from a state not trusted
            bad[int(nf[0]) + 1:] = False
        # each step's wanted number of pieces (< 1: room to merge), then the points placed
        # so that every step gets one piece's worth (equidistribution, per segment of t)
        r_cpu = ratio.double().cpu()
        want = r_cpu.clamp(min=1e-30, max=1e30) ** (1.0 / (tab.err_order + 1)) / safety
        want = torch.where(torch.isfinite(r_cpu), want, torch.tensor(float(MAX_SPLIT)))
        bad_c = bad.cpu()
        lo = 1.0 / MERGE if r <= MERGE_ROUNDS else 1.0
        want = torch.where(bad_c, want.clamp(2, MAX_SPLIT), want.clamp(lo, 1.0))
        if nf.numel():  # after a blow-up nothing is known: split as at the blow-up
            want[int(nf[0]) + 1:] = float(MAX_SPLIT)
        seg, frac = _remesh(seg, frac, want, T - 1)
        prev_grid, prev_Y = grid.detach(), Yall.detach()
    raise ConvergenceError(
        f"{name}: the adaptive grid did not meet rtol/atol in {max_rounds} rounds (grid of "
        f"{seg.shape[0]} steps, largest error ratio {info.error_ratio:.3g}); raise "
        f"options['max_rounds'] or loosen rtol/atol", info.iterations, info.error_ratio, info)


def _remesh(seg: Tensor, frac: Tensor, want: Tensor, n_seg: int) -> tuple[Tensor, Tensor]:
    """New grid points (seg, frac) such that each segment of t holds ceil(sum of its steps'
    ``want``) steps, spread by the piecewise linear inverse of the cumulative ``want`` (each
    old step k gets about want[k] new steps, fewer than one where want < 1)."""
    S = seg.shape[0]
    same = torch.cat([seg[1:] == seg[:-1], torch.zeros(1, dtype=torch.bool)])
    end = torch.where(same, torch.cat([frac[1:], frac.new_ones(1)]), torch.ones_like(frac))
    C = torch.cat([want.new_zeros(1), torch.cumsum(want, 0)])  # (S + 1,) global cumulative
    P = torch.zeros(n_seg, dtype=want.dtype).index_add_(0, seg, want)  # (n_seg,)
    first = torch.full((n_seg,), S, dtype=torch.long).scatter_reduce_(
        0, seg, torch.arange(S), reduce="amin")  # each segment's first step
    N = torch.ceil(P - 1e-9).clamp(min=1).long()  # (n_seg,) new steps per segment
    new_seg = torch.repeat_interleave(torch.arange(n_seg), N)
    j = torch.arange(int(N.sum())) - (torch.cumsum(N, 0) - N)[new_seg]
    target = C[first[new_seg]] + j.double() * (P / N.double())[new_seg]
    k = (torch.searchsorted(C, target, right=True) - 1).clamp(0, S - 1)
    last = first + torch.zeros(n_seg, dtype=torch.long).index_add_(
        0, seg, torch.ones(S, dtype=torch.long)) - 1
    k = torch.minimum(torch.maximum(k, first[new_seg]), last[new_seg])  # inside the segment
    w = ((target - C[k]) / want[k]).clamp(0, 1)
    new_frac = torch.where(j == 0, torch.zeros_like(w), frac[k] + w * (end[k] - frac[k]))
    return new_seg, new_frac


def _normal(x):
    """A tensor made outside inference mode (a clone), tuples too."""
    if isinstance(x, (tuple, list)):
        return type(x)(_normal(v) for v in x)
    return x.clone() if isinstance(x, Tensor) and x.is_inference() else x


def _integrate(name: str, func: Callable, y0, t, *, method, signature: str, solver, tol,
               max_iter, on_failure: str, return_info: bool, options, rtol=1e-7, atol=1e-9):
    if torch.is_inference_mode_enabled():
        # the Jacobians need autograd, which inference tensors refuse: solve outside inference
        # mode, without recording (as under no_grad)
        with torch.inference_mode(False), torch.no_grad():
            return _integrate(name, func, _normal(y0), _normal(t), method=method,
                              signature=signature, solver=solver, tol=tol, max_iter=max_iter,
                              on_failure=on_failure, return_info=return_info, options=options,
                              rtol=_normal(rtol), atol=_normal(atol))
    if not callable(func):
        raise TypeError(f"{name}: func must be callable (a function or nn.Module); got "
                        f"{type(func).__name__}")
    method = _method(name, method, signature)
    kind = _kind(method, signature)
    state = _State(name, y0)
    if signature == "dae" and state.flat:
        raise ValueError(f"{name}: y0 must be a tensor with a state dim, (..., D); got "
                         f"{'a tuple' if state.tuple else 'a 0-d tensor'}")
    t = _times(name, t, state.y)
    _scalars(name, solver, tol, max_iter, on_failure, rtol, atol, state.y)
    opts = _options(name, options, kind, method)
    if isinstance(rtol, Tensor) or isinstance(atol, Tensor):
        for key, v in (("rtol", rtol), ("atol", atol)):
            if isinstance(v, Tensor) and (state.flat or torch.broadcast_shapes(
                    v.shape, state.y.shape) != state.y.shape):
                if v.numel() != 1:
                    raise ValueError(f"{name}: {key} must be a number or a tensor that "
                                     f"broadcasts to y0's shape {tuple(state.y.shape)} (a "
                                     f"number for tuple states); got shape {tuple(v.shape)}")
    zeros = (torch.zeros_like(state.y),) if signature == "dae" else ()

    def field_of(st: _State) -> VectorField:
        return VectorField(st.wrap(func), st.y.shape[:-1], st.y.shape[-1], signature, name)

    fld = field_of(state)
    with torch.no_grad():  # one plain call, so a wrong shape is reported plainly
        probe = fld.func(t[0], state.y, *zeros)
    fld.check_output(probe, state.y)
    vectorised = fld.probe(t[0], state.y, *zeros)
    if signature == "ode" and not state.flat and fld.B > 1 and _mixes_rows(fld, t[0], state.y):
        state.make_flat()
        fld = field_of(state)
        vectorised = fld.probe(t[0], state.y)
        with torch.no_grad():
            probe = fld.func(t[0], state.y)
    y = state.y
    batch, D = y.shape[:-1], y.shape[-1]
    B = math.prod(batch)
    tol = float(tol if tol is not None else DEFAULT_TOL[y.dtype])
    T = t.shape[0]
    k = opts.get("substeps", 1) or 1
    if solver is None:  # newton, unless func runs point by point or (D, D) Jacobians are huge
        solver = "newton" if vectorised and D <= DENSE_MAX else "sequential"
    info = OdeInfo(solver=solver, method=method, substeps=k, tol=tol, vectorised=vectorised,
                   vmap_error=fld.vmap_error, one_system=state.flat)

    def done(out: Tensor, grid: Tensor | None = None, Yall: Tensor | None = None):
        info.vectorised, info.vmap_error = fld.vectorised, fld.vmap_error
        if grid is not None and return_info:
            info.grid = grid.detach()
            info.trajectory = state.unflatten(Yall.movedim(-2, 0))
            info.step = step
        res = state.unflatten(out)
        return (res, info) if return_info else res

    def step(ta: Tensor, tb: Tensor, ya):
        """One step of the method from ya (the caller's structure) at ta to tb."""
        yv = torch.cat([v.reshape(-1) for v in ya]).reshape(1, -1) if state.tuple else \
            (ya.reshape(1, -1) if state.flat else ya)
        x = torch.stack([ta, tb]).to(yv.dtype).expand(B, 2)  # (B, 2): one step per row
        yb = cell(x, yv.reshape(B, D)).reshape(yv.shape)
        res = state.unflatten(yb.unsqueeze(0))
        return tuple(r[0] for r in res) if isinstance(res, tuple) else res[0]

    if T == 1:
        info.converged, info.residual = True, 0.0
        info.step_residuals = y.new_zeros(0)
        return done(y.unsqueeze(0).clone())  # (1, ..., D)
    perturb = bool(opts.get("perturb", False)) or opts.get("jump_t") is not None
    cell = _make_cell(kind, method, fld, signature, B, y, tol, perturb)
    if kind == "adaptive":
        info.solver = choose_solver(2 * T, B, D, y.device) if solver == "auto" else solver
        out, grid, Yall = _adaptive(name, cell, y, t, probe.reshape(y.shape), rtol=rtol,
                                    atol=atol, opts=opts, state=state, solver=info.solver,
                                    tol=tol, max_iter=max_iter, on_failure=on_failure, info=info)
        return done(out, grid, Yall)
    if opts.get("step_size") is not None:
        grid = _step_size_grid(t, float(opts["step_size"]))
    elif opts.get("grid_constructor") is not None:
        grid = opts["grid_constructor"](func, y0, t)
        if not isinstance(grid, Tensor) or grid.dim() != 1 or grid.shape[0] < 2:
            raise ValueError(f"{name}: options['grid_constructor'] must return a 1-D tensor of "
                             f"at least two times; got {getattr(grid, 'shape', grid)!r}")
        grid = grid.to(device=t.device, dtype=t.dtype)
        if bool(grid[0] != t[0]) or bool(grid[-1] != t[-1]):
            raise ValueError(f"{name}: grid_constructor must return a grid from t[0] to t[-1]; "
                             f"got {float(grid[0])!r} .. {float(grid[-1])!r} for t from "
                             f"{float(t[0])!r} to {float(t[-1])!r}")
        _monotone(name, "the grid", grid)
    else:
        grid = _grid(t, k)
    S = grid.shape[0] - 1
    chosen = choose_solver(S, B, D, y.device) if solver == "auto" else solver
    info.solver = chosen
    Yall = _solve_on(name, cell, y, grid, chosen, tol, max_iter, on_failure,
                     opts.get("window"), info, method)  # (..., S + 1, D)
    if opts.get("step_size") is None and opts.get("grid_constructor") is None:
        return done(Yall[..., ::k, :].movedim(-2, 0), grid, Yall)  # (T, ..., D)
    Yg = Yall.movedim(-2, 0)  # (G, ..., D)
    F = None
    if opts.get("interp", "linear") == "cubic":
        F = fld(grid, Yg.reshape(S + 1, B, D)).reshape(Yg.shape)
    return done(_interp(grid, Yg, t, opts.get("interp", "linear"), F), grid, Yall)


def odeint(func: Callable, y0: Tensor | tuple[Tensor, ...], t: Tensor, *,
           rtol: float | Tensor = 1e-7, atol: float | Tensor = 1e-9, method: str | None = None,
           options: dict | None = None, event_fn: Callable | None = None,
           solver: str | None = None, tol: float | None = None, max_iter: int | None = None,
           on_failure: str = "fallback", return_info: bool = False) -> Any:
    """Solve dy/dt = func(t, y), y(t[0]) = y0, on the times t, parallel in time.

    torchdiffeq's ``odeint`` call, unchanged (its arguments, defaults, method names, options,
    dtype rules and tuple states), solved over the whole time grid at once.

    Args:
        func: ``func(t, y) -> dy/dt``, torchdiffeq's convention: t a 0-d tensor, y and the
            result shaped like y0. A function or an nn.Module (its parameters get gradients).
            It is evaluated at many time points in one call by ``torch.func.vmap``; a func that
            vmap cannot batch (Python branches on t or y, ``.item()``) is called point by
            point and, with the default solver, stepped in time (``info.vectorised``). The
            leading dims of a y0 of shape (..., D) are solved as independent systems (a batch
            of initial conditions); a func that mixes them is detected at t[0] and the whole
            state is then one system (``info.one_system``).
        y0: (..., D), a 0-d tensor, or a tuple of tensors; float32 or float64.
        t: (T,) strictly increasing or strictly decreasing (integrates backwards), on y0's
            device; any real dtype, cast to y0's (the solve runs in y0's dtype).
        rtol: the adaptive methods' relative tolerance on each step's local error, as
            torchdiffeq: a number or a tensor broadcasting to y0. Fixed-grid methods ignore it.
        atol: the absolute tolerance, likewise.
        method: ``None`` is ``"dopri5"``. Adaptive (an embedded error estimate, rtol/atol
            met by refining the grid in rounds, ``_adaptive``): ``"dopri5"``, ``"bosh3"``,
            ``"fehlberg2"``, ``"adaptive_heun"``. Explicit on the grid: ``"euler"``,
            ``"midpoint"``, ``"heun2"``, ``"heun3"``, ``"rk4"`` (the 3/8 rule, as
            torchdiffeq). Implicit on the grid (``paraseq.ode.schemes``):
            ``"backward_euler"`` (alias ``"implicit_euler"``), ``"trapezoid"``,
            ``"implicit_midpoint"``, ``"radau_iia_3"`` (``"radauIIA3"``), ``"radau_iia_5"``
            (``"radauIIA5"``), ``"gauss_legendre_4"`` (``"gl4"``), ``"gauss_legendre_6"``
            (``"gl6"``).
        options: by kind of method, ``OPTIONS`` (an unknown key is an error listing the valid
            ones).
        event_fn: ``event_fn(t, y) -> tensor``: integrate from t[0] until it crosses zero
            (t must have two times; the second is ignored) and return ``(event_t,
            solution)`` as ``odeint_event`` does.
        solver: how the method is solved over the grid: ``"newton"`` (DEER: dense scans,
            quadratic convergence; the default when func runs under vmap),
            ``"quasi_newton"``, ``"damped_newton"``, ``"picard"``, ``"sequential"`` (stepped
            in time: the reference; the default when func cannot run under vmap or the state
            has more than ``DENSE_MAX`` entries per system) or ``"auto"`` (``choose_solver``).
        tol: tolerance on each step's method residual (``OdeInfo.residual``); default by
            dtype, 1e-10 float64 and 1e-5 float32 (``paraseq.solve.api.DEFAULT_TOL``).
        max_iter: cap on the iterations over the grid (``solve_recurrence``'s default if None).
        on_failure: ``"fallback"``: where the parallel solve does not converge, keep its
            converged prefix and go on from there in windows of steps, each solved in
            parallel, as long as the solver can reach (chaotic systems; see ``_solve_grid``),
            stepping sequentially only where not one step converges; the result satisfies
            the method at every step. ``"raise"``: ``ConvergenceError``. ``"warn"``: the
            last iterate, with a warning. If an implicit step's own local equations cannot be
            solved (a step too large for stiff or exploding dynamics), no solver can help:
            ``ConvergenceError`` unless ``"warn"``.
        return_info: also return an ``OdeInfo``.

    Returns:
        (T, ..., D) with ``out[0] == y0`` (a tuple of (T, *shape) for a tuple y0);
        ``(out, info)`` with ``return_info``.

    Gradients with respect to y0, t and func's parameters (and tensors it closes over) are
    those of the discrete method on the grid used: by ``solve_recurrence``'s adjoint (one
    reverse scan) for the parallel solvers, by autograd through the steps for
    ``"sequential"``. Under ``torch.inference_mode()`` the solve runs as under no_grad.

    ``tol`` bounds each step's residual, so the parallel and the sequential trajectories may
    drift apart by up to about steps x tol (float32: 1e-5 per step), and further on chaotic
    systems; float64 keeps that drift far below the methods' own error.
    """
    if event_fn is not None:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != 2:
            raise ValueError(f"odeint: with event_fn, t must hold two times (the start; the "
                             f"second is ignored), as torchdiffeq: We require len(t) == 2 when "
                             f"in event handling mode, but got "
                             f"len(t)={len(t) if isinstance(t, Tensor) and t.dim() else t!r}.")
        return _event(func, y0, t[0], event_fn=event_fn, reverse_time=bool(t[1] < t[0]),
                      rtol=rtol, atol=atol, method=method, options=options, solver=solver,
                      tol=tol, max_iter=max_iter, on_failure=on_failure)
    return _integrate("odeint", func, y0, t, method=method, signature="ode", solver=solver,
                      tol=tol, max_iter=max_iter, on_failure=on_failure,
                      return_info=return_info, options=options, rtol=rtol, atol=atol)


def odeint_implicit(func: Callable, y0: Tensor, t: Tensor, *, method: str = "backward_euler",
                    solver: str | None = None, tol: float | None = None,
                    max_iter: int | None = None, on_failure: str = "fallback",
                    return_info: bool = False, options: dict | None = None
                    ) -> Tensor | tuple[Tensor, OdeInfo]:
    """Solve the implicit DAE func(t, y, dy/dt) = 0, y(t[0]) = y0, on the grid t (DEER's form).

    ``func(t, y, dy) -> residual`` shaped like y (D equations in D unknowns; algebraic
    equations simply do not involve dy). The only method is ``"backward_euler"``: each step
    solves func(t_k, y_k, (y_k - y_{k-1}) / h) = 0 for y_k. y0 must be consistent (satisfy
    the algebraic equations) and have a state dim, (..., D). Everything else is as
    ``odeint``'s fixed-grid methods: shapes, solvers, tolerance (on the state: the scheme
    residual is the Newton correction's size, not |func|), failure policy, gradients, options.
    """
    return _integrate("odeint_implicit", func, y0, t, method=method, signature="dae",
                      solver=solver, tol=tol, max_iter=max_iter, on_failure=on_failure,
                      return_info=return_info, options=options)


def odeint_adjoint(func: Callable, y0, t: Tensor, *, rtol=1e-7, atol=1e-9,
                   method: str | None = None, options: dict | None = None,
                   event_fn: Callable | None = None, adjoint_rtol=None, adjoint_atol=None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params=None, **kwargs):
    """torchdiffeq's ``odeint_adjoint`` call: ``odeint``, with gradients by an adjoint.

    paraseq's gradients are an adjoint already (``solve_recurrence``'s: one reverse linear
    scan over the grid, the exact gradient of the discrete solution returned), so the forward
    is ``odeint``'s and ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_method`` and
    ``adjoint_options`` (checked as torchdiffeq checks them) have nothing to set: the reverse
    pass is not a second ODE solve. ``adjoint_params``: the tensors that get gradients; by
    default ``func.parameters()``, and then func must be an nn.Module (torchdiffeq's rule).
    A module's parameters and buffers outside ``adjoint_params`` get no gradient (func is
    called through ``torch.func.functional_call`` with them detached). Other keywords are
    ``odeint``'s (solver, tol, max_iter, on_failure, return_info).
    """
    if adjoint_params is None and not isinstance(func, torch.nn.Module):
        raise ValueError("odeint_adjoint: func must be an instance of nn.Module to specify the "
                         "adjoint parameters; alternatively they can be specified explicitly "
                         "via the `adjoint_params` argument. If there are no parameters then "
                         "it is allowable to set `adjoint_params=()`.")
    if adjoint_method is not None:
        _method("odeint_adjoint", adjoint_method, "ode")
    if adjoint_options is not None and not isinstance(adjoint_options, dict):
        raise TypeError(f"odeint_adjoint: adjoint_options must be a dict or None; got "
                        f"{type(adjoint_options).__name__}")
    for v in (adjoint_rtol, adjoint_atol):
        if v is not None:
            _scalars("odeint_adjoint", None, None, None, "fallback", v, 0.0, torch.zeros(1))
    if adjoint_params is not None and isinstance(func, torch.nn.Module):
        keep = {id(p) for p in adjoint_params}
        named = {**dict(func.named_parameters()), **dict(func.named_buffers())}
        if any(id(v) not in keep for v in named.values()):
            module = func

            def func(t_, y_):
                values = {k: (v if id(v) in keep else v.detach()) for k, v in named.items()}
                return torch.func.functional_call(module, values, (t_, y_))

    return odeint(func, y0, t, rtol=rtol, atol=atol, method=method, options=options,
                  event_fn=event_fn, **kwargs)


EVENT_CHUNKS = 48
"""Chunks (of doubling length from 1) integrated in search of an event before giving up."""


def _event(func: Callable, y0, t0: Tensor, *, event_fn: Callable, reverse_time: bool,
           **kwargs) -> tuple[Tensor, object]:
    """Integrate from t0 in chunks until event_fn(t, y) changes sign; find the crossing on its
    step by regula falsi (Illinois) over that step of the method; return (event_t, solution)
    with solution = [y0, y(event_t)] in y0's structure. Gradients: event_t by the implicit
    function theorem (d event_t = -(dg) / (dg/dt + dg/dy f), one Newton correction of the
    event equation with a detached denominator), y(event_t) through the step and event_t."""
    name = "odeint_event"
    if not callable(event_fn):
        raise TypeError(f"{name}: event_fn must be callable, event_fn(t, y) -> tensor; got "
                        f"{type(event_fn).__name__}")
    if not isinstance(t0, Tensor) or t0.numel() != 1:
        raise ValueError(f"{name}: t0 must be a tensor holding one time; got "
                         f"{getattr(t0, 'shape', t0)!r}")
    direction = -1.0 if reverse_time else 1.0
    kwargs = dict(kwargs)
    m = _method(name, kwargs.get("method"), "ode")
    if m not in ADAPTIVE and (kwargs.get("options") or {}).get("step_size") is None:
        raise ValueError(f"{name}: event handling with the fixed-grid method {m!r} requires "
                         f"options={{'step_size': h}} (as torchdiffeq): the search integrates "
                         f"chunks of growing length, which a grid of output times alone "
                         f"would cross in one step")
    kwargs.pop("return_info", None)
    state = _State(name, y0)
    t0 = t0.reshape(()).to(state.y.dtype)

    def g_of(t_, ys):  # event_fn on the caller's structure, flattened
        out = event_fn(t_, ys)
        if not isinstance(out, Tensor):
            raise TypeError(f"{name}: event_fn(t, y) must return a tensor; got "
                            f"{type(out).__name__}")
        return out.reshape(-1)

    g0 = g_of(t0, y0).detach()
    cur_t, cur_y = t0, y0
    length = 1.0
    for _ in range(EVENT_CHUNKS):
        t1 = cur_t.detach() + direction * length
        tt = torch.stack([cur_t, t1.to(cur_t.dtype)])
        _, info = odeint(func, cur_y, tt, return_info=True, **kwargs)
        grid, Yg, step = info.grid, info.trajectory, info.step
        # Yg: per grid point the caller's structure; g at every point
        G = grid.shape[0]
        gs = torch.stack([g_of(grid[i].detach(), _at(Yg, i, detach=True)) for i in range(G)])
        crossed = (torch.sign(gs) != torch.sign(g0)) & (gs != 0) | (gs == 0)  # (G, E)
        crossed[0] = False
        hit = torch.nonzero(crossed.any(-1))
        if hit.numel():
            k = int(hit[0])
            e = int(torch.nonzero(crossed[k])[0])
            return _locate(name, func, g_of, e, grid, Yg, k, step, y0)
        cur_t, cur_y = grid[-1], _at(Yg, G - 1)
        length *= 2
    raise RuntimeError(f"{name}: no event: event_fn did not cross zero up to t = "
                       f"{float(cur_t):.6g}")


def _at(Y, i: int, detach: bool = False):
    pick = (lambda v: v[i].detach()) if detach else (lambda v: v[i])
    return tuple(pick(v) for v in Y) if isinstance(Y, tuple) else pick(Y)


def _locate(name: str, func: Callable, g_of: Callable, e: int, grid: Tensor, Yg, k: int,
            step: Callable, y0) -> tuple[Tensor, object]:
    """The event on grid step k - 1 -> k (component e of event_fn changes sign there)."""
    ta, tb = grid[k - 1], grid[k]
    ya = _at(Yg, k - 1)
    ya_d = _at(Yg, k - 1, detach=True)

    def gval(tau: Tensor) -> float:
        with torch.no_grad():
            return float(g_of(tau, step(ta.detach(), tau, ya_d))[e])

    a, b = ta.detach(), tb.detach()
    ga, gb = gval(a), gval(b)
    c, gc = b, gb
    eps = torch.finfo(grid.dtype).eps
    for _ in range(200):  # regula falsi, Illinois: superlinear, and brackets the root
        if gb == 0 or abs(float(b - a)) <= 4 * eps * max(abs(float(a)), abs(float(b)), 1e-300):
            break
        c = b - gb * (b - a) / (gb - ga)
        gc = gval(c)
        if gc == 0:
            b, gb = c, gc
            break
        if (gc > 0) != (gb > 0):
            a, ga = b, gb
        else:
            ga = ga / 2
        b, gb = c, gc
    tau = b.detach()
    # gradients: y(tau) through the step from the differentiable grid state, event_t by one
    # Newton correction of g(t, y(t)) = 0 with its derivative along the solution detached
    y_star = step(ta, tau, ya)
    g_star = g_of(tau, y_star)[e]
    with torch.enable_grad():
        tt = tau.clone().requires_grad_(True)
        yy = tuple(v.detach().clone().requires_grad_(True) for v in
                   (y_star if isinstance(y_star, tuple) else (y_star,)))
        gg = g_of(tt, yy if isinstance(y_star, tuple) else yy[0])[e]
        grads = torch.autograd.grad(gg, (tt, *yy), allow_unused=True) if gg.requires_grad \
            else (None,) * (1 + len(yy))
        with torch.no_grad():
            f = func(tau, yy if isinstance(y_star, tuple) else yy[0])
    fs = f if isinstance(f, tuple) else (f,)
    slope = (grads[0] if grads[0] is not None else torch.zeros_like(tau)) + sum(
        (gr * fv).sum() for gr, fv in zip(grads[1:], fs, strict=True) if gr is not None)
    if not bool(slope != 0):
        raise ValueError(f"{name}: event_fn is flat along the solution at the event "
                         f"(t = {float(tau):.6g}): its time derivative there is 0")
    event_t = tau - (g_star - g_star.detach()) / slope.detach()
    shift = event_t - tau
    if isinstance(y_star, tuple):
        y_ev = tuple(v + fv.detach() * shift for v, fv in zip(y_star, fs, strict=True))
        solution = tuple(torch.stack([a0, b0]) for a0, b0 in zip(y0, y_ev, strict=True))
    else:
        y_ev = y_star + fs[0].detach() * shift
        solution = torch.stack([y0, y_ev])
    return event_t, solution


def odeint_event(func: Callable, y0, t0: Tensor, *, event_fn: Callable,
                 reverse_time: bool = False, odeint_interface: Callable | None = None,
                 **kwargs) -> tuple[Tensor, object]:
    """torchdiffeq's ``odeint_event``: integrate from t0 until ``event_fn(t, y)`` crosses zero.

    Returns ``(event_t, solution)``: the event time (0-d, differentiable in y0, func's and
    event_fn's parameters by the implicit function theorem) and the states at t0 and event_t,
    (2, ...) (a tuple of them for a tuple y0). ``reverse_time`` integrates backwards. A
    multivariate event_fn stops at the first component to cross zero. The search integrates
    chunks [t0, t0 + 1], then of doubling length (``EVENT_CHUNKS`` of them), with ``odeint``
    (``odeint_interface``: ``paraseq.odeint`` or ``paraseq.odeint_adjoint``, the same solve
    here) and the keywords given (rtol, atol, method, options, solver, ...); the crossing is
    then located on its grid step by regula falsi over one step of the method.
    """
    if odeint_interface not in (None, odeint, odeint_adjoint):
        raise ValueError("odeint_event: odeint_interface must be paraseq.odeint or "
                         "paraseq.odeint_adjoint")
    if odeint_interface is odeint_adjoint:
        func_ = func
        params = kwargs.pop("adjoint_params", None)
        if params is None and not isinstance(func_, torch.nn.Module):
            odeint_adjoint(func_, y0, t0.reshape(1), event_fn=None)  # raises torchdiffeq's error
        for key in ("adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options"):
            kwargs.pop(key, None)
    return _event(func, y0, t0, event_fn=event_fn, reverse_time=reverse_time, **kwargs)
