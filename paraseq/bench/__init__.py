"""The benchmark harness: timing, tables and plots shared by the CLI and benchmarks/."""

from .timing import Timing, cpu_name, format_table, time_call

__all__ = ["Timing", "cpu_name", "format_table", "time_call"]
