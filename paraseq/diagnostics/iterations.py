"""K*(T): the iterations each parallel method needs to reach tolerance, for every prefix
length T of one input sequence, from one run per method.

Newton, quasi-Newton, Picard and Jacobi are causal: iterate k at step t depends on steps <= t
only, and so does the first guess (h_t = f(x_t, 0)), so the iterates of a solve of the prefix
x_1..x_L are the first L steps of the full solve's iterates. The prefix solve stops at the
first iteration k whose residual is under tol at every step t <= L, which is when the full
run's first unconverged step (over the batch and features) has reached L. So one run that
records, per iteration, the first unconverged step gives K*(L) for every L at once.
Damped Newton (Levenberg-Marquardt on the whole trajectory) is not causal: its steps and its
damping depend on the whole sum of squares, so each length is a separate solve.

Shape letters: ``...`` the caller's batch dims, B their product, T time, n input size,
D state size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..solve import api as solve_api
from ..solve.cell import FlatCell, State, StateLayout
from ..solve.iterate import _lin, _sanitize, first_failure, newton_step, residual_map, shift
from ..solve.methods import METHODS, resolve_jacobian

__all__ = ["CAUSAL", "IterationTable", "iterations"]

CAUSAL = ("newton", "quasi_newton", "picard", "jacobi")
"""Methods whose K*(T) for every prefix comes from one run."""


@dataclass
class IterationTable:
    """K*(T) per method: ``counts[method][i]`` iterations for the prefix of length
    ``lengths[i]`` (None: not reached within ``max_iter``). ``frontier[method]`` (causal
    methods) lists, per iteration k = 0, 1, ..., the first unconverged step after k
    iterations (T once all have converged): the run the counts were read from."""

    lengths: list[int]
    counts: dict[str, list[int | None]]
    frontier: dict[str, list[int]] = field(default_factory=dict)
    tol: float = math.nan
    max_iter: int = 0

    def rows(self) -> list[list[object]]:
        """One row per length: [T, K*(T) per method ("-" where not reached)]."""
        return [[L, *("-" if self.counts[m][i] is None else self.counts[m][i]
                      for m in self.counts)] for i, L in enumerate(self.lengths)]

    def format(self, markdown: bool = False) -> str:
        from ..bench import format_table

        return format_table(["T", *self.counts], self.rows(), markdown)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """K*(T) against T (log axis), one line per method; saved to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m, ks in self.counts.items():
            pts = [(L, k) for L, k in zip(self.lengths, ks, strict=True) if k is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", ms=3, label=m)
        ax.set(xscale="log", xlabel="sequence length T", ylabel="iterations to tol, K*(T)",
               title=title or f"iterations to tol {self.tol:.0e}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def default_lengths(T: int) -> list[int]:
    """About four lengths per decade from 2 to T, and T."""
    if T <= 2:
        return list(range(1, T + 1))
    n = max(2, int(4 * math.log10(T)) + 1)
    out = sorted({max(1, round(T ** (i / (n - 1)))) for i in range(n)} | {T})
    return out


def _counts_from_frontier(frontier: list[int], lengths: Sequence[int]) -> list[int | None]:
    out: list[int | None] = []
    for L in lengths:
        out.append(next((k for k, f in enumerate(frontier) if f >= L), None))
    return out


def causal_run(fc: FlatCell, name: str, source: str | None, X: Tensor, h0: Tensor, tol: float,
               cap: int, cell_dtype: torch.dtype) -> list[int]:
    """The first unconverged step after each iteration k = 0..K of one solve of the whole
    sequence, iterated until every step has converged or ``cap`` iterations (no stall rule):
    the same linearisation, scan and sanitising as ``solve_recurrence``'s loop."""
    m = METHODS[name]
    T = X.shape[1]
    D = h0.shape[-1]
    H = solve_api._default_init(fc, X, D, cell_dtype).to(h0.dtype)  # (B, T, D)
    frontier = []
    for k in range(cap + 1):
        Hp = shift(H, h0)  # (B, T, D)
        F, A = _lin(fc, m, source, X, Hp, cell_dtype, 0, None)
        frontier.append(first_failure(residual_map(H, F), tol))
        if frontier[-1] >= T or k == cap:
            break
        H = _sanitize(newton_step(m, F, A, Hp, h0))
    return frontier


@torch.no_grad()
def iterations(cell: Callable, inputs: Tensor, h0: State | None = None, *,
               methods: Sequence[str] = ("newton", "quasi_newton", "damped_newton"),
               lengths: Sequence[int] | None = None, tol: float | None = None,
               max_iter: int | None = None, jacobian: str = "auto") -> IterationTable:
    """K*(T), the iterations ``solve_recurrence(cell, inputs[..., :T, :], method=m)`` needs to
    bring the residual under ``tol``, for every T in ``lengths`` and every method m.

    Args:
        cell, inputs (..., T, n), h0: as ``solve_recurrence``.
        methods: any of "newton", "quasi_newton", "damped_newton", "picard", "jacobi".
        lengths: prefix lengths, each in [1, T] (default: about four per decade, and T).
        tol: default by dtype, as ``solve_recurrence`` (``DEFAULT_TOL``).
        max_iter: iterations allowed (default: T for the causal methods, where Newton and
            Jacobi always converge; ``DEFAULT_MAX_ITER`` for damped_newton); a length not
            reached within it counts None.
        jacobian: "auto", "analytic" or "autograd", as ``solve_recurrence``.

    The counts are those of the general solver (``solve_recurrence`` without the compiled
    Newton sweeps of paraseq's own cells, and without its stall rule, which would give up and
    fall back where this keeps iterating); the causal methods are measured in one run over
    the whole sequence (see the module's notes), holding B T Jacobians at once.

    Returns:
        ``IterationTable`` (its ``format()`` is the table, ``plot(path)`` the figure).
    """
    if not isinstance(inputs, Tensor) or inputs.dim() < 2 or not inputs.is_floating_point():
        raise TypeError(f"iterations: inputs must be a floating point tensor of shape "
                        f"(..., T, n); got {inputs!r:.60}")
    T, n = inputs.shape[-2:]
    if T < 1:
        raise ValueError("iterations: inputs must have at least one time step")
    methods = list(methods)
    for m in methods:
        if m not in METHODS or m == "sequential":
            raise ValueError(f"iterations: unknown parallel method {m!r}; valid: "
                             + ", ".join(repr(k) for k in METHODS if k != "sequential"))
    if jacobian not in ("auto", "analytic", "autograd"):
        raise ValueError(f"iterations: jacobian must be 'auto', 'analytic' or 'autograd'; got "
                         f"{jacobian!r}")
    lengths = default_lengths(T) if lengths is None else sorted({int(L) for L in lengths})
    if not lengths or lengths[0] < 1 or lengths[-1] > T:
        raise ValueError(f"iterations: lengths must be in [1, T] = [1, {T}]; got {lengths}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        raise ValueError(f"iterations: max_iter must be an int >= 1; got {max_iter!r}")
    tol = float(tol if tol is not None else solve_api.DEFAULT_TOL.get(inputs.dtype, 1e-5))
    batch = inputs.shape[:-2]
    B = math.prod(batch)
    if h0 is None:
        h0 = solve_api._default_state(cell, batch, inputs)
    layout = StateLayout.of(h0)
    fc = FlatCell(cell, layout)
    X = inputs.reshape(B, T, n)  # (B, T, n)
    h0_flat = solve_api._as_batch_state(h0, layout, batch, "h0", inputs)  # (B, D)
    table = IterationTable(lengths=lengths, counts={}, tol=tol,
                           max_iter=max_iter if max_iter is not None else T)
    for m in methods:
        if m in CAUSAL:
            source = resolve_jacobian(METHODS[m], jacobian, fc)
            cap = min(T, max_iter) if max_iter is not None else T
            front = causal_run(fc, m, source, X, h0_flat, tol, cap, inputs.dtype)
            table.frontier[m] = front
            table.counts[m] = _counts_from_frontier(front, lengths)
        else:  # damped_newton: one solve per length
            counts: list[int | None] = []
            for L in lengths:
                with warnings.catch_warnings():  # a length not reached counts None
                    warnings.simplefilter("ignore", RuntimeWarning)
                    _, info = solve_api.solve_recurrence(
                        cell, inputs[..., :L, :], h0, method=m, tol=tol, max_iter=max_iter,
                        jacobian=jacobian, on_failure="warn", return_info=True)
                counts.append(info.iterations if info.converged and not info.fell_back
                              and info.time_chunks == 1 else None)
            table.counts[m] = counts
    return table
