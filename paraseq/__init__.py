"""paraseq: sequential models evaluated in parallel over time, in PyTorch."""

from __future__ import annotations

import importlib

from ._version import __version__
from .ode import odeint, odeint_adjoint, odeint_event, odeint_implicit
from .result import ConvergenceError, SolveInfo
from .scan import linear_scan
from .solve import solve_recurrence

# subpackages reachable after a bare ``import paraseq`` (as torch.nn after ``import torch``),
# imported on first use so that ``import paraseq`` stays as light as its functional API
_SUBPACKAGES = ("attention", "bench", "cells", "diagnostics", "distributed", "gpu", "nn", "ode",
                "scan", "solve", "ssm", "train")

__all__ = ["ConvergenceError", "SolveInfo", "__version__", "linear_scan", "odeint",
           "odeint_adjoint", "odeint_event", "odeint_implicit", "solve_recurrence"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
