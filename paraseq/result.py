"""The result types that the solvers, the compiled cells and the modules share: what a solve
did (``SolveInfo``) and the error a failed solve raises (``ConvergenceError``). They sit below
``paraseq.cells`` and ``paraseq.solve`` so that neither imports the other for them."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

__all__ = ["ConvergenceError", "SolveInfo"]


class ConvergenceError(RuntimeError):
    """A parallel solve stopped before its residual was under tolerance (on_failure="raise")."""

    def __init__(self, message: str, iterations: int, residual: float, info: SolveInfo):
        super().__init__(message)
        self.iterations = iterations
        self.residual = residual
        self.info = info


@dataclass
class SolveInfo:
    """What a solve did. ``residuals`` holds the scaled residual before each linear solve and
    after the last (so ``len(residuals) == iterations + 1`` for one uninterrupted solve)."""

    method: str
    iterations: int = 0
    converged: bool = False
    residual: float = math.nan
    fell_back: bool = False
    fallback_from: int | None = None
    restarts: int = 0
    jacobian: str | None = None
    tol: float = math.nan
    time_chunks: int = 1
    linear_solves: int = 0
    """Every linear solve (scan) made, over all time chunks and restarts. ``iterations`` is
    the most that any one time step went through: for a solve split into time chunks (see
    ``paraseq.solve.api.DENSE_MEMORY_LIMIT``), the iterations of the chunk that needed most,
    since the chunks are solved one after another, each from the end of the one before."""
    residuals: list[float] = field(default_factory=list)
    lle: float | None = None
    """The largest Lyapunov exponent that ``method="auto"`` estimated on a prefix before
    committing to a parallel method (``paraseq.diagnostics.predict``), or None."""

    @property
    def contraction(self) -> list[float]:
        """The residual's ratio per iteration, residuals[k + 1] / residuals[k] (nan where a
        residual is 0 or not finite): below 1 where an iteration helped; Newton's fall
        towards 0 as it converges quadratically, a crawl stays near 1."""
        r = self.residuals
        return [b / a if a > 0 and math.isfinite(a) and math.isfinite(b) else math.nan
                for a, b in itertools.pairwise(r)]
