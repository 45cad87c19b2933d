"""paraseq: sequential models evaluated in parallel over time, in PyTorch."""

from ._version import __version__
from .ode import odeint, odeint_implicit
from .scan import linear_scan
from .solve import ConvergenceError, SolveInfo, solve_recurrence

__all__ = ["ConvergenceError", "SolveInfo", "__version__", "linear_scan", "odeint",
           "odeint_implicit", "solve_recurrence"]
