"""Timing that a benchmark can be judged by: warm-up, device sync, median of repeats."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median: float  # seconds
    best: float
    repeats: int


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
              budget: float | None = None) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones.

    ``budget`` (seconds) caps the repeats: after the first timed run, no more runs are started
    than fit in the budget (at least one always runs).
    """
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
        if budget is not None and i == 0 and repeats > 1:
            repeats = max(1, min(repeats, int(budget / max(times[0], 1e-9))))
        if len(times) >= repeats:
            break
    return Timing(statistics.median(times), min(times), len(times))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 markdown: bool = False) -> str:
    """A plain text table, columns right-aligned except the first; or a GitHub markdown one."""
    if markdown:
        out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(out)
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's word elsewhere), for the
    header of every benchmark table."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


PASSES = {"fwd": (False,), "fwd+bwd": (True,), "both": (False, True)}
"""``--passes`` of ``python -m paraseq bench``: whether each pass runs a backward."""


def grid_from_args(base: dict, args, flags: Sequence[tuple[str, str]]) -> dict | None:
    """``base`` with the sizes given on the command line (``flags``: (grid key, option name)
    pairs, e.g. ("T", "lengths")) in place of its own; None, after printing the error, when
    one of them is below 1."""
    grid = dict(base)
    for key, flag in flags:
        values = getattr(args, flag)
        if values is not None:
            if min(values) < 1:
                print(f"error: --{flag} must be >= 1", file=sys.stderr)
                return None
            grid[key] = tuple(values)
    return grid
