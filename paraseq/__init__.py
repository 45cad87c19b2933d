"""paraseq: sequential models evaluated in parallel over time, in PyTorch."""

from ._version import __version__
from .scan import linear_scan

__all__ = ["__version__", "linear_scan"]
