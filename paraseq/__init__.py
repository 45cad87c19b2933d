"""paraseq: sequential models evaluated in parallel over time, in PyTorch."""

from ._version import __version__
from .scan import linear_scan
from .solve import ConvergenceError, SolveInfo, solve_recurrence

__all__ = ["ConvergenceError", "SolveInfo", "__version__", "linear_scan", "solve_recurrence"]
