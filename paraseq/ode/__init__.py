"""ODEs and implicit DAEs solved parallel in time: an implicit scheme on the grid is a
recurrence, solved by ``solve_recurrence`` (``paraseq.ode.api``)."""

from .api import OPTIONS, SOLVERS, OdeInfo, choose_solver, odeint, odeint_implicit
from .schemes import SCHEMES

__all__ = ["OPTIONS", "SCHEMES", "SOLVERS", "OdeInfo", "choose_solver", "odeint",
           "odeint_implicit"]
