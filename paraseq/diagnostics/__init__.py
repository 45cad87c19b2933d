"""Will parallel pay? Lyapunov exponents of a recurrence (``lyapunov``) and the iterations
each parallel method needs for every sequence length (``iterations``), measured before (or
instead of) trusting a solve."""

from .iterations import IterationTable, iterations
from .lle import JACOBIANS, LyapunovResult, lyapunov

__all__ = ["JACOBIANS", "IterationTable", "LyapunovResult", "iterations", "lyapunov"]
