"""ODEs and implicit DAEs solved parallel in time: a one-step method on the grid is a
recurrence, solved by ``solve_recurrence`` (``paraseq.ode.api``); torchdiffeq's calls
(``odeint``, ``odeint_adjoint``, ``odeint_event``) accepted unchanged."""

from .api import (
                  ALIASES,
                  METHODS,
                  OPTIONS,
                  SOLVERS,
                  OdeInfo,
                  choose_solver,
                  odeint,
                  odeint_adjoint,
                  odeint_event,
                  odeint_implicit,
)
from .explicit import ADAPTIVE, EXPLICIT
from .schemes import SCHEMES

__all__ = ["ADAPTIVE", "ALIASES", "EXPLICIT", "METHODS", "OPTIONS", "SCHEMES", "SOLVERS",
           "OdeInfo", "choose_solver", "odeint", "odeint_adjoint", "odeint_event",
           "odeint_implicit"]
