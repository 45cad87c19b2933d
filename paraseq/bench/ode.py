"""The odeint benchmark: a neural ODE over long time grids, paraseq.odeint in parallel against
the same scheme stepped in time, an explicit RK4 loop, and torchdiffeq's fixed-grid RK4 when it
is installed (optional: never a dependency). The ``ode`` section of ``python -m paraseq bench``
and the body of ``benchmarks/ode.py``.

The vector field: an MLP (D + 1 -> 32 -> 32 -> D, tanh; t is an input) with torch's default
initialisation, state size D = 4, batch B of initial conditions; t on [0, 0.01 T] with T + 1
grid points. Columns:

- ``parallel``: ``odeint(method="trapezoid", solver="newton")``, its iterations over the grid and
  its windows (more than 1 when Newton did not reach the end of the grid at once);
- ``sequential``: ``odeint(solver="sequential")``: the trapezoid scheme stepped in time, one
  local Newton solve per step (the reference the parallel solver must reproduce);
- ``rk4 loop``: the classical explicit RK4 in a Python loop (four calls of the field per step,
  no Newton): what a user with a non-stiff neural ODE would otherwise write;
- ``torchdiffeq``: ``torchdiffeq.odeint(method="rk4")`` on the same grid, if installed.

Passes: ``fwd`` under torch.no_grad; ``fwd+bwd``: the loss sum(y(t_T)^2), then its gradient
with respect to the field's parameters (parallel: the adjoint scan; the loops: autograd through
every step). Every solver is warmed up on a short grid first. A call is timed once, or, if it
took under a second, as the median of ``repeats`` more runs. A loop longer than ``loop_steps``
steps is timed on its first ``loop_steps`` steps and scaled up linearly (marked ``~``); a
parallel run whose time, extrapolated linearly from the previous T, would exceed ``budget``
seconds is skipped.

Shape letters: B batch, T steps, D state size.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .timing import PASSES, cpu_name, format_table, grid_from_args, time_call

D, HIDDEN = 4, 32
FULL = dict(T=(1_000, 10_000, 100_000), batch=(1, 16), loop_steps=10_000)
QUICK = dict(T=(1_000,), batch=(1,), loop_steps=50)
"""The grids: ``python -m paraseq bench`` (and benchmarks/ode.py) and their ``--quick``."""


class Field(torch.nn.Module):
    """dy/dt = MLP([y, t]): (..., D) -> (..., D)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D + 1, HIDDEN), torch.nn.Tanh(),
                                       torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                                       torch.nn.Linear(HIDDEN, D))

    def forward(self, t, y):
        return self.net(torch.cat([y, t.expand(*y.shape[:-1], 1)], dim=-1))


def rk4_loop(f, y0, t):
    """Classical RK4 on the grid t, one step per interval: (T + 1, ..., D)."""
    ys, y = [y0], y0
    for i in range(t.shape[0] - 1):
        h, s = t[i + 1] - t[i], t[i]
        k1 = f(s, y)
        k2 = f(s + h / 2, y + h / 2 * k1)
        k3 = f(s + h / 2, y + h / 2 * k2)
        k4 = f(s + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    return torch.stack(ys)


def solver_names() -> list[str]:
    """The columns: torchdiffeq's only when it imports."""
    names = ["parallel", "sequential", "rk4 loop"]
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return names
    return [*names, "torchdiffeq"]


def runner(name: str, f, y0, t, backward: bool, infos: list | None = None) -> Callable:
    """A closure that runs one solver once on t (or a prefix passed to it), and the backward
    pass if asked; the parallel solver appends its OdeInfo to ``infos``."""
    from ..ode import odeint

    if name == "parallel":
        def solve(tt):
            y, info = odeint(f, y0, tt, method="trapezoid", solver="newton", return_info=True)
            if infos is not None:
                infos.append(info)
            return y
    elif name == "sequential":
        def solve(tt):
            return odeint(f, y0, tt, method="trapezoid", solver="sequential")
    elif name == "rk4 loop":
        def solve(tt):
            return rk4_loop(f, y0, tt)
    elif name == "torchdiffeq":
        import torchdiffeq

        def solve(tt):
            return torchdiffeq.odeint(f, y0, tt, method="rk4")
    else:
        raise ValueError(f"runner: unknown solver {name!r}; valid: parallel, sequential, "
                         f"rk4 loop, torchdiffeq")

    def go(tt=t):
        if not backward:
            with torch.no_grad():
                return solve(tt)
        y = solve(tt)
        grads = torch.autograd.grad(y[-1].square().sum(), list(f.parameters()))
        return y, grads

    return go


def timed(fn: Callable[[], object], repeats: int):
    """(result of the first run, seconds): the first run's time, or, for calls under a second,
    the median of ``repeats`` more runs."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if first > 1.0 or repeats <= 1:
        return out, first
    return out, time_call(fn, repeats=repeats, warmup=0, budget=5.0).median


def measure(T: int, B: int, backward: bool, names: Iterable[str], *,
            dtype: torch.dtype = torch.float32, repeats: int = 3, loop_steps: int = 10_000,
            budget: float = 60.0, history: dict | None = None) -> dict:
    """One row: seconds per solver (``name``; ``name + " ~"`` marks an extrapolated loop; None:
    skipped), the parallel solver's iterations and windows, and ``"|par - seq|"``.
    ``history`` maps (B, pass) to the parallel solver's last (T, seconds), for the skip."""
    history = {} if history is None else history
    torch.manual_seed(T + B)
    f = Field().to(dtype)
    y0 = torch.randn(B, D, dtype=dtype)  # (B, D)
    t = torch.linspace(0, 0.01 * T, T + 1, dtype=dtype)  # (T + 1,)
    row: dict = {"T": T, "B": B, "pass": "fwd+bwd" if backward else "fwd"}
    outs, infos = {}, []
    for name in names:
        go = runner(name, f, y0, t, backward, infos)
        if name == "parallel":
            key = (B, backward)
            prev = history.get(key)
            if prev is not None and prev[1] * T / prev[0] > budget:
                row[name] = None
                continue
            out, sec = timed(go, repeats)
            history[key] = (T, sec)
            row[name], row[name + " ~"] = sec, False
        else:  # loops: one run, on a prefix of at most loop_steps steps
            n = min(T, loop_steps)
            out, sec = timed(lambda go=go, n=n: go(t[:n + 1]), 1)
            row[name], row[name + " ~"] = sec * T / n, n < T
        outs[name] = out[0] if backward else out
    if infos:
        row["iterations"], row["windows"] = infos[0].iterations, infos[0].windows
    if "parallel" in outs and "sequential" in outs:
        seq = outs["sequential"]
        row["|par - seq|"] = (outs["parallel"][:seq.shape[0]] - seq).abs().max().item()
    return row


def run(lengths: Iterable[int], batches: Iterable[int], passes: Iterable[bool],
        names: list[str], *, progress: Callable[[int, int, str], None] | None = None,
        **kw) -> list[dict]:
    """``measure`` over passes x batches x lengths (in that nesting), after a warm-up of every
    solver and pass on a short grid (the first odeint call of a process pays one-off setup,
    about a second); ``kw`` goes to ``measure``."""
    jobs = [(bwd, B, T) for bwd in passes for B in batches for T in lengths]
    for bwd in sorted(set(passes)):
        measure(8, 1, bwd, names, **{**kw, "repeats": 1})
    rows, history = [], {}
    for i, (bwd, B, T) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), f"{'fwd+bwd' if bwd else 'fwd'} B {B} T {T:.0e}")
        rows.append(measure(T, B, bwd, names, history=history, **kw))
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return rows


def _fmt(row: dict, name: str) -> str:
    v = row.get(name)
    if v is None:
        return "skip" if name in row else "-"
    return ("~" if row.get(name + " ~") else "") + f"{v:.3g}"


def _speed(row: dict, name: str) -> str:
    if row.get("parallel") is None or row.get(name) is None:
        return "-"
    return ("~" if row.get(name + " ~") else "") + f"{row[name] / row['parallel']:.1f}x"


def table(rows: list[dict], names: list[str], markdown: bool = False) -> str:
    others = [n for n in names if n != "parallel"]
    headers = ["pass", "B", "T", "parallel (s)", "iterations", "windows",
               *(f"{n} (s)" for n in others), *(f"vs {n}" for n in others), "|par - seq|"]
    body = [[r["pass"], r["B"], f"{r['T']:,}", _fmt(r, "parallel"), r.get("iterations", "-"),
             r.get("windows", "-"), *(_fmt(r, n) for n in others),
             *(_speed(r, n) for n in others),
             f"{r['|par - seq|']:.1e}" if "|par - seq|" in r else "-"] for r in rows]
    return format_table(headers, body, markdown)


def header(dtype: torch.dtype) -> str:
    return (f"odeint on {cpu_name()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, {datetime.date.today()}: neural ODE, MLP field D = {D}, "
            f"hidden {HIDDEN}, {str(dtype).removeprefix('torch.')}, trapezoid, default tol")


def notes(loop_steps: int, budget: float) -> str:
    return ("vs X: X's time / parallel's time (> 1: parallel is faster); ~: extrapolated from "
            f"the first {loop_steps:,} steps; skip: estimated over {budget:g} s; |par - seq|: "
            "max difference on the steps both ran (the tolerance is per step: up to steps x tol "
            "apart).")


def write_csv(rows: list[dict], names: list[str], path: Path | str) -> None:
    """One line per row: seconds per solver (empty: skipped or not run) and whether each was
    extrapolated, the parallel solver's iterations and windows, |par - seq|."""
    fields = ["pass", "B", "T", *(f"{n.replace(' ', '_')}_s" for n in names),
              *(f"{n.replace(' ', '_')}_extrapolated" for n in names if n != "parallel"),
              "iterations", "windows", "max_par_seq"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for r in rows:
            w.writerow([r["pass"], r["B"], r["T"], *(r.get(n) for n in names),
                        *(r.get(n + " ~") for n in names if n != "parallel"),
                        r.get("iterations"), r.get("windows"), r.get("|par - seq|")])


def cli_section(args: argparse.Namespace) -> int:
    """The ``ode`` section of ``python -m paraseq bench`` (``paraseq.bench.cli``): the grid
    FULL or QUICK, ``--lengths``/``--batches``/``--passes``/``--repeats`` as for the GRU
    section, ``--skip-after`` as the budget; the table, then ``bench_ode.csv`` in ``--out``."""
    from ..cli import _progress

    grid = grid_from_args(QUICK if args.quick else FULL, args,
                          (("T", "lengths"), ("batch", "batches")))
    if grid is None:
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    passes = PASSES[args.passes]
    names = solver_names()
    print(f"\n{header(torch.float32)}")
    if "torchdiffeq" not in names:
        print("(torchdiffeq is not installed: its column is left out)")
    start = time.perf_counter()
    rows = run(grid["T"], grid["batch"], passes, names, progress=_progress,
               repeats=min(args.repeats, 2) if args.quick else args.repeats,
               loop_steps=grid["loop_steps"], budget=args.skip_after)
    print()
    print(table(rows, names, args.markdown))
    print(notes(grid["loop_steps"], args.skip_after))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, names, out / "bench_ode.csv")
    print(f"\nCSV saved to {out / 'bench_ode.csv'}")
    print(f"odeint section finished in {time.perf_counter() - start:.1f} s")
    return 0
