"""The result types that the solvers, the compiled cells and the modules share: what a solve
did (``SolveInfo``) and the error a failed solve raises (``ConvergenceError``). They sit below
``paraseq.cells`` and ``paraseq.solve`` so that neither imports the other for them."""

from __future__ import annotations

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
    residuals: list[float] = field(default_factory=list)
