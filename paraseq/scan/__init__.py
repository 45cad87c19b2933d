"""Linear recurrences x_t = a_t x_{t-1} + b_t, solved by scans. See ``linear_scan``."""

from .api import BACKENDS, linear_scan

__all__ = ["BACKENDS", "linear_scan"]
