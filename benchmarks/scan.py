"""Time the ``paraseq.linear_scan`` backends on CPU.

    python benchmarks/scan.py [--quick] [--csv PATH] [--markdown]
    python benchmarks/scan.py --first-call

Grid: float32, diagonal a, forward, no x0; T in {1e3, 1e4, 1e5, 1e6} and B*D in {1, 64, 4096},
as tensors of shape (B, T, D) with D = min(B*D, 64) and B = B*D / D. Cells of more than 2^27
elements are skipped (memory). a is uniform in [0, 1), b standard normal, drawn once per cell
from a fixed seed.

Every available backend in ``paraseq.scan.BACKENDS`` ("numba" when numba is installed), the
private ``hillis_steele_scan`` (the O(T log T) alternative to the odd-even reduction of
"parallel"), the numba kernel writing into a preallocated result (column "numba_out": the
kernel alone, without the page faults and zeroing of a fresh result, which for results over
glibc's 32 MiB mmap threshold cost about as much again) and ``backend="auto"`` are timed as:
one warm-up call, then the median of N timed calls (N = 5; 3 for cells over 1e7 elements and
with --quick). The sequential backend is a Python loop over T: from T = 1e5 on it is timed with a
single call, and at T = 1e6 it is not run; its time there is estimated as 10x its time on the
cell's first 1e5 steps (marked "~").

Reported per backend: time, speedup over sequential, max abs error against a float64 reference
(the sequential loop on .double() inputs; at T = 1e6 the float64 "parallel" backend instead),
and effective bandwidth, 12 bytes per element (read a, read b, write x in float32) / time. The
same bytes moved by ``torch.add(a, b, out=x)`` (read 8, write 4 per element) and by a numba
kernel doing the same on the scans' thread pool (``paraseq.scan.compiled.add_reference``), timed
the same way in the same run, are the "copy" roofline: each scan's bandwidth is shown as a
percentage of the faster of the two. ``torch.add(a, b)`` into a fresh result (column "new
result") is shown beside them: it pays the page faults of a new tensor as every scan does.
The load average is recorded at the start and the end.

``--first-call`` instead times, in fresh subprocesses, ``import paraseq`` and the first and
second calls of the numba backend, once with an empty numba cache (the compile) and once with
the cache that run left (the cache load), for the three kernels.

The text tables go to stdout (GitHub markdown with --markdown), progress to stderr, and --csv
writes one row per (cell, backend) with every number.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

import paraseq
from paraseq.scan import BACKENDS, compiled
from paraseq.scan.api import choose_backend
from paraseq.scan.parallel import hillis_steele_scan

T_GRID = (1_000, 10_000, 100_000, 1_000_000)
WIDTH_GRID = (1, 64, 4096)  # B*D: scalars per time step
QUICK_T_GRID = (1_000, 10_000)
QUICK_WIDTH_GRID = (1, 64)
MAX_D = 64
MAX_ELEMENTS = 2**27  # larger cells are skipped (memory)
BIG_CELL = 10_000_000  # elements above which N drops to 3
REPS, BIG_REPS, QUICK_REPS = 5, 3, 3
SEQ_SINGLE_T = 100_000  # sequential: one timed call from this T on
SEQ_ESTIMATE_T = 1_000_000  # sequential: estimated from its first SEQ_SINGLE_T steps from here on
REF_PARALLEL_T = 1_000_000  # float64 reference by "parallel" instead of "sequential" from here on
BYTES_PER_ELEMENT = 12  # float32: read a, read b, write x
SEED = 0
AUTO, HILLIS, MEMCPY, COPY_NUMBA = "auto", "hillis_steele", "memcpy", "copy_numba"
NUMBA_OUT = "numba_out"  # the numba backend writing into a preallocated result
ADD_NEW = "add_new_result"  # torch.add(a, b) without out=: pays for a fresh result like a scan


@dataclass
class Timing:
    seconds: float
    reps: int
    estimated: bool = False  # extrapolated, not measured on the full cell
    err: float | None = None  # max abs error against the float64 reference; None: not run


@dataclass
class Cell:
    T: int
    width: int  # B*D
    B: int
    D: int
    skipped: bool = False
    reference: str = ""  # backend that computed the float64 reference
    memcpy: Timing | None = None  # torch.add(a, b, out=x)
    copy_numba: Timing | None = None  # the same bytes by a numba kernel on the scans' threads
    add_new: Timing | None = None  # torch.add(a, b) into a fresh result, as linear_scan returns
    timings: dict[str, Timing] = field(default_factory=dict)  # backend name -> timing
    auto_pick: str = ""

    @property
    def elements(self) -> int:
        return self.B * self.T * self.D

    def gbps(self, seconds: float) -> float:
        return BYTES_PER_ELEMENT * self.elements / seconds / 1e9

    @property
    def copy_seconds(self) -> float:
        """The roofline: the faster of the two copies."""
        copies = [c.seconds for c in (self.memcpy, self.copy_numba) if c is not None]
        return min(copies)

    def speedup(self, name: str) -> float:
        return self.timings["sequential"].seconds / self.timings[name].seconds


def backend_names() -> list[str]:
    """The backends timed as table columns: the registry's available ones, then Hillis-Steele
    and (with numba) the numba kernel into a preallocated result."""
    names = [name for name, b in BACKENDS.items()
             if b.is_available(torch.device("cpu"))] + [HILLIS]
    return names + ([NUMBA_OUT] if compiled.AVAILABLE else [])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


def machine_line() -> str:
    load = f", load average at start: {load_average()}"
    return (f"paraseq {paraseq.__version__}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU: {cpu_model()}, "
            f"date: {datetime.date.today().isoformat()}{load}")


def median_time(fn: Callable[[], Tensor], reps: int, warmup: bool = True) -> tuple[float, Tensor]:
    """Median wall time of ``reps`` calls (after one untimed call), and the last call's output."""
    if warmup:
        fn()
    times = []
    out = None
    for _ in range(reps):
        out = None  # free the previous output before the next call
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def max_abs_err(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def time_memcpy(a: Tensor, b: Tensor, reps: int) -> Timing:
    """The roofline: torch.add reads a and b and writes one output, the bytes a scan moves."""
    out = torch.empty_like(a)  # (B, T, D)
    seconds, _ = median_time(lambda: torch.add(a, b, out=out), reps)
    return Timing(seconds, reps)


def time_copy_numba(a: Tensor, b: Tensor, reps: int) -> Timing | None:
    """The same bytes by a numba kernel on the thread pool the numba scans use."""
    if not compiled.AVAILABLE:
        return None
    out = torch.empty_like(a)  # (B, T, D)
    seconds, _ = median_time(lambda: compiled.add_reference(a, b, out), reps)
    return Timing(seconds, reps)


def time_backend(name: str, a: Tensor, b: Tensor, ref: Tensor, reps: int) -> Timing:
    """Time one backend on a (B, T, D) cell and check it against the float64 reference."""
    T = a.shape[-2]
    if name == "sequential" and T >= SEQ_ESTIMATE_T:  # too slow to run: time a prefix
        n = SEQ_SINGLE_T
        a_head, b_head = a[:, :n].contiguous(), b[:, :n].contiguous()  # (B, n, D)
        seconds, _ = median_time(
            lambda: paraseq.linear_scan(a_head, b_head, backend="sequential"), 1, warmup=False)
        return Timing(seconds * T / n, 1, estimated=True)
    if name == HILLIS:
        def fn() -> Tensor:
            return hillis_steele_scan(a, b, None, dense=False)  # (B, T, D)
    elif name == NUMBA_OUT:
        out = torch.empty_like(a)  # (B, T, D)

        def fn() -> Tensor:
            return compiled.numba_scan(a, b, None, dense=False, out=out)  # (B, T, D)
    else:
        def fn() -> Tensor:
            return paraseq.linear_scan(a, b, backend=name)  # (B, T, D)
    if name == "sequential" and T >= SEQ_SINGLE_T:  # one call; the long loop warms itself up
        seconds, x = median_time(fn, 1, warmup=False)
        return Timing(seconds, 1, err=max_abs_err(x, ref))
    seconds, x = median_time(fn, reps)
    return Timing(seconds, reps, err=max_abs_err(x, ref))


def run_cell(T: int, width: int, reps: int) -> Cell:
    D = min(width, MAX_D)
    cell = Cell(T=T, width=width, B=width // D, D=D)
    if cell.elements > MAX_ELEMENTS:
        cell.skipped = True
        return cell
    if cell.elements > BIG_CELL:
        reps = min(reps, BIG_REPS)
    gen = torch.Generator().manual_seed(SEED)
    a = torch.rand(cell.B, T, D, generator=gen)  # (B, T, D)
    b = torch.randn(cell.B, T, D, generator=gen)  # (B, T, D)

    cell.reference = "parallel" if T >= REF_PARALLEL_T else "sequential"
    ref = paraseq.linear_scan(a.double(), b.double(), backend=cell.reference)  # (B, T, D)

    cell.memcpy = time_memcpy(a, b, reps)
    cell.copy_numba = time_copy_numba(a, b, reps)
    cell.add_new = Timing(median_time(lambda: torch.add(a, b), reps)[0], reps)
    for name in backend_names():
        cell.timings[name] = time_backend(name, a, b, ref, reps)
    cell.auto_pick = choose_backend(T, D, cell.B, False, torch.float32, torch.device("cpu"))
    seconds, x = median_time(lambda: paraseq.linear_scan(a, b), reps)
    cell.timings[AUTO] = Timing(seconds, reps, err=max_abs_err(x, ref))
    return cell


# --- formatting -------------------------------------------------------------------------------


def fmt_T(T: int) -> str:
    return f"1e{round(math.log10(T))}" if T == 10 ** round(math.log10(T)) else str(T)


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1e-2:
        return f"{s * 1e3:.2f} ms"
    if s < 1e-1:
        return f"{s * 1e3:.1f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def fmt_gbps(x: float) -> str:
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}"


def row_label(cell: Cell) -> list[str]:
    mark = "*" if cell.reference == "parallel" else ""
    return [fmt_T(cell.T) + mark, str(cell.width)]


def time_table(cells: Sequence[Cell]) -> tuple[list[str], list[list[str]]]:
    names = backend_names()
    header = ["T", "B*D", "shape (B, T, D)", *names, "auto (pick)"]
    rows = []
    for c in cells:
        if c.skipped:
            rows.append([*row_label(c), "skipped (memory)", *["-"] * (len(names) + 1)])
            continue
        row = [*row_label(c), f"({c.B}, {c.T}, {c.D})"]
        est = "~" if c.timings["sequential"].estimated else ""
        for name in [*names, AUTO]:
            t = c.timings[name]
            tilde = "~" if t.estimated else ""
            text = f"{tilde}{fmt_time(t.seconds)} ({est}{fmt_ratio(c.speedup(name))})"
            row.append(f"{c.auto_pick}: {text}" if name == AUTO else text)
        rows.append(row)
    return header, rows


def bandwidth_table(cells: Sequence[Cell]) -> tuple[list[str], list[list[str]]]:
    names = backend_names()
    header = ["T", "B*D", "copy GB/s: torch.add / numba / new result", *names, "auto"]
    rows = []
    for c in cells:
        if c.skipped:
            rows.append([*row_label(c), "skipped (memory)", *["-"] * (len(names) + 1)])
            continue
        roof = c.gbps(c.copy_seconds)
        copies = " / ".join(fmt_gbps(c.gbps(t.seconds)) if t is not None else "-"
                            for t in (c.memcpy, c.copy_numba, c.add_new))
        row = [*row_label(c), copies]
        for name in [*names, AUTO]:
            t = c.timings[name]
            bw = c.gbps(t.seconds)
            tilde = "~" if t.estimated else ""
            row.append(f"{tilde}{fmt_gbps(bw)} ({tilde}{100 * bw / roof:.1f}%)")
        rows.append(row)
    return header, rows


def error_table(cells: Sequence[Cell]) -> tuple[list[str], list[list[str]]]:
    names = backend_names()
    header = ["T", "B*D", "reference", *names, "auto"]
    rows = []
    for c in cells:
        if c.skipped:
            rows.append([*row_label(c), "skipped (memory)", *["-"] * (len(names) + 1)])
            continue
        row = [*row_label(c), f"float64 {c.reference}"]
        for name in [*names, AUTO]:
            err = c.timings[name].err
            row.append("not run" if err is None else f"{err:.1e}")
        rows.append(row)
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(s.ljust(w) for s, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def render_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i >= 2 else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


TABLES = (
    ("Time per call (speedup over sequential)", time_table),
    ("Effective bandwidth in GB/s, 12 bytes per element (percent of the faster copy)",
     bandwidth_table),
    ("Max abs error against the float64 reference", error_table),
)


def footnotes(cells: Sequence[Cell]) -> list[str]:
    notes = []
    if any(c.reference == "parallel" for c in cells):
        notes.append("* float64 reference computed by backend='parallel' (the float64 sequential "
                     "loop takes too long at this T).")
    if any(not c.skipped and c.timings["sequential"].estimated for c in cells):
        notes.append(f"~ sequential not run: its time is {SEQ_ESTIMATE_T // SEQ_SINGLE_T}x its "
                     f"time on the first {SEQ_SINGLE_T} steps; speedups against it are "
                     "estimates too.")
    return notes


def report(cells: Sequence[Cell], markdown: bool, machine: str, reps_line: str) -> str:
    render = render_markdown if markdown else render_text
    parts = [machine + f", at the end: {load_average()}", reps_line]
    for title, table in TABLES:
        parts.append(f"**{title}**" if markdown else title)
        parts.append(render(*table(cells)))
    # a footnote's leading "*" would start a markdown list
    parts += [("\\" + n if markdown and n.startswith("*") else n) for n in footnotes(cells)]
    return "\n\n".join(parts) + "\n"


def write_csv(cells: Sequence[Cell], path: str) -> None:
    fields = ["T", "BD", "B", "D", "elements", "backend", "auto_pick", "seconds", "reps",
              "estimated", "speedup_vs_sequential", "gbps", "memcpy_gbps", "fraction_of_memcpy",
              "max_abs_err", "reference", "note"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for c in cells:
            base = {"T": c.T, "BD": c.width, "B": c.B, "D": c.D, "elements": c.elements}
            if c.skipped:
                for name in [*backend_names(), AUTO, MEMCPY, COPY_NUMBA, ADD_NEW]:
                    w.writerow({**base, "backend": name, "note": "skipped (memory)"})
                continue
            roof = c.gbps(c.copy_seconds)
            for name, t in ((MEMCPY, c.memcpy), (COPY_NUMBA, c.copy_numba), (ADD_NEW, c.add_new)):
                if t is not None:
                    w.writerow({**base, "backend": name, "seconds": t.seconds, "reps": t.reps,
                                "estimated": False, "gbps": c.gbps(t.seconds),
                                "memcpy_gbps": roof,
                                "fraction_of_memcpy": c.copy_seconds / t.seconds})
            for name, t in c.timings.items():
                bw = c.gbps(t.seconds)
                w.writerow({**base, "backend": name,
                            "auto_pick": c.auto_pick if name == AUTO else "",
                            "seconds": t.seconds, "reps": t.reps, "estimated": t.estimated,
                            "speedup_vs_sequential": c.speedup(name), "gbps": bw,
                            "memcpy_gbps": roof, "fraction_of_memcpy": bw / roof,
                            "max_abs_err": "" if t.err is None else t.err,
                            "reference": f"float64 {c.reference}",
                            "note": "estimated" if t.estimated else ""})


# --- first call: compile and cache-load cost of the numba backend ------------------------------

FIRST_CALL_CASES = (  # (label, shape of a, shape of b, structure): one per kernel, float32
    ("diagonal, wide rows", (16, 1000, 64), (16, 1000, 64), "diagonal"),
    ("diagonal, one channel", (1, 1000, 1), (1, 1000, 1), "diagonal"),
    ("dense 8 x 8", (4, 1000, 8, 8), (4, 1000, 8), "dense"),
)
_FIRST_CALL_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, paraseq
t1 = time.perf_counter()
a = torch.rand(*{a}) / {scale}
b = torch.randn(*{b})
import numba
t2 = time.perf_counter()
paraseq.linear_scan(a, b, backend="numba", structure="{structure}")
t3 = time.perf_counter()
paraseq.linear_scan(a, b, backend="numba", structure="{structure}")
t4 = time.perf_counter()
print(json.dumps(dict(import_paraseq=t1 - t0, import_numba=t2 - t1, first=t3 - t2,
                      second=t4 - t3)))
"""


def first_call_report() -> str:
    """Time ``import paraseq`` and the numba backend's first two calls in fresh processes:
    with an empty numba cache (compile) and with the cache the first process wrote (load)."""
    if not compiled.AVAILABLE:
        return "numba is not installed: nothing to compile\n"
    lines = [machine_line(),
             "",
             "First call of backend='numba' in a fresh process, float32 (seconds). 'import numba'",
             "is timed apart (numba is imported on first use, not by import paraseq); 'first'",
             "is then the kernels' compile (cold: empty NUMBA_CACHE_DIR) or load from numba's",
             "on-disk cache (warm: the cache the cold run wrote).",
             ""]
    header = ["case", "cache", "import paraseq", "import numba", "first call", "second call"]
    rows = []
    for label, a, b, structure in FIRST_CALL_CASES:
        code = _FIRST_CALL_CHILD.format(a=a, b=b, structure=structure,
                                        scale=a[-1] if structure == "dense" else 1)
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            for state in ("cold", "warm"):
                done = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                      capture_output=True, text=True)
                t = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append([f"{label} {a}", state, f"{t['import_paraseq']:.2f}",
                             f"{t['import_numba']:.2f}", f"{t['first']:.2f}",
                             f"{t['second'] * 1e3:.2f} ms"])
                print(f"{label} {state}: {t}", file=sys.stderr, flush=True)
    lines.append(render_text(header, rows))
    lines.append(f"\nload average at the end: {load_average()}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="T in {1e3, 1e4}, B*D in {1, 64}, N = 3 (a smoke test)")
    parser.add_argument("--csv", metavar="PATH", help="write one row per (cell, backend)")
    parser.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    parser.add_argument("--first-call", action="store_true",
                        help="time the numba backend's first call (compile / cache load) in "
                             "fresh processes, and nothing else")
    args = parser.parse_args(argv)
    if args.first_call:
        sys.stdout.write(first_call_report())
        return

    t_grid, width_grid = (QUICK_T_GRID, QUICK_WIDTH_GRID) if args.quick else (T_GRID, WIDTH_GRID)
    reps = QUICK_REPS if args.quick else REPS
    machine = machine_line()  # before the run, for its load average
    start = time.perf_counter()
    cells = []
    for T in t_grid:
        for width in width_grid:
            t0 = time.perf_counter()
            cells.append(run_cell(T, width, reps))
            took = f"{time.perf_counter() - t0:.1f} s"
            status = "skipped (memory)" if cells[-1].skipped else took
            print(f"T={fmt_T(T)} B*D={width}: {status}", file=sys.stderr, flush=True)
    print(f"total {time.perf_counter() - start:.1f} s", file=sys.stderr)

    big = "" if args.quick else f" ({BIG_REPS} for cells over {fmt_T(BIG_CELL)} elements)"
    reps_line = (f"float32, diagonal a, forward; median of {reps} calls after one warm-up{big}; "
                 f"sequential timed once from T = {fmt_T(SEQ_SINGLE_T)}.")
    sys.stdout.write(report(cells, args.markdown, machine, reps_line))
    if args.csv:
        write_csv(cells, args.csv)


if __name__ == "__main__":
    main()
