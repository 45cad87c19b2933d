"""Fixed-point solvers over whole trajectories: ``solve_recurrence`` and its methods."""

from .api import ConvergenceError, SolveInfo, solve_recurrence
from .methods import METHODS

__all__ = ["METHODS", "ConvergenceError", "SolveInfo", "solve_recurrence"]
