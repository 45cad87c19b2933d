"""The benchmark harness: timing, tables and plots shared by the CLI and benchmarks/."""

from .timing import Timing, format_table, time_call

__all__ = ["Timing", "format_table", "time_call"]
