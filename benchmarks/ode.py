"""A neural ODE over long time grids: paraseq.odeint in parallel against the same scheme stepped
in time, an explicit RK4 loop, and torchdiffeq's fixed-grid RK4 when it is installed.

    python benchmarks/ode.py                 # the grid in benchmarks/README.md
    python benchmarks/ode.py --quick         # a smoke run (about 20 s)
    python benchmarks/ode.py --markdown --csv ode.csv

The vector field: an MLP (D + 1 -> 32 -> 32 -> D, tanh; t is an input) with torch's default
initialisation, state size D = 4, float32 (--dtype), batch B of initial conditions; t on [0, 0.01 T]
with T + 1 grid points. Columns:

- ``parallel``: ``odeint(method="trapezoid", solver="newton")``, its iterations over the grid and
  its windows (more than 1 when Newton did not reach the end of the grid at once);
- ``sequential``: ``odeint(solver="sequential")``: the trapezoid scheme stepped in time, one
  local Newton solve per step (the reference the parallel solver must reproduce);
- ``rk4 loop``: the classical explicit RK4 in a Python loop (four calls of the field per step,
  no Newton): what a user with a non-stiff neural ODE would otherwise write;
- ``torchdiffeq``: ``torchdiffeq.odeint(method="rk4")`` on the same grid, if installed.

Passes: ``fwd`` under torch.no_grad; ``fwd+bwd``: the loss sum(y(t_T)^2), then its gradient
with respect to the field's parameters (parallel: the adjoint scan; the loops: autograd
through every step). Timings are medians of ``--repeats`` runs after one warm-up, for calls of
at most a few seconds, else one run. A loop longer than ``--loop-steps`` steps is timed on its
first ``--loop-steps`` steps and scaled up linearly (marked ``~``); a parallel run whose time,
extrapolated linearly from the previous T, would exceed ``--budget`` seconds is skipped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq import odeint
from paraseq.bench import cpu_name, format_table, time_call

D, HIDDEN = 4, 32


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




def runner(name: str, f, y0, t, backward: bool):
    """A closure that runs one solver once (and the backward pass if asked)."""
    if name == "parallel":
        def solve(tt):
            return odeint(f, y0, tt, method="trapezoid", solver="newton")
    elif name == "sequential":
        def solve(tt):
            return odeint(f, y0, tt, method="trapezoid", solver="sequential")
    elif name == "rk4 loop":
        def solve(tt):
            return rk4_loop(f, y0, tt)
    else:
        import torchdiffeq

        def solve(tt):
            return torchdiffeq.odeint(f, y0, tt, method="rk4")

    def go(tt=t):
        if not backward:
            with torch.no_grad():
                return solve(tt)
        y = solve(tt)
        grads = torch.autograd.grad(y[-1].square().sum(), list(f.parameters()))
        return y, grads

    return go


def timed(fn, repeats: int):
    """(result of the first run, seconds): the first run's time, or, for calls under a second,
    the median of ``repeats`` more runs."""
    import time

    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    if first > 1.0 or repeats <= 1:
        return out, first
    return out, time_call(fn, repeats=repeats, warmup=0, budget=5.0).median


def measure(T: int, B: int, backward: bool, names: list[str], args, history: dict) -> dict:
    torch.manual_seed(T + B)
    dtype = getattr(torch, args.dtype)
    f = Field().to(dtype)
    y0 = torch.randn(B, D, dtype=dtype)  # (B, D)
    t = torch.linspace(0, 0.01 * T, T + 1, dtype=dtype)  # (T + 1,)
    row: dict = {"T": T, "B": B, "pass": "fwd+bwd" if backward else "fwd"}
    outs = {}
    for name in names:
        go = runner(name, f, y0, t, backward)
        if name == "parallel":
            key = (name, B, backward)
            prev = history.get(key)
            if prev is not None and prev[1] * T / prev[0] > args.budget:
                row[name] = None
                continue
            out, sec = timed(go, args.repeats)
            history[key] = (T, sec)
            row[name], row[name + " ~"] = sec, False
        else:  # loops: one run, on a prefix of at most --loop-steps steps
            n = min(T, args.loop_steps)
            out, sec = timed(lambda go=go, n=n: go(t[:n + 1]), 1)
            row[name], row[name + " ~"] = sec * T / n, n < T
        outs[name] = out[0] if backward else out
    if "parallel" in outs:
        with torch.no_grad():  # the iterations, once more (cheap next to the loops)
            _, info = odeint(f, y0, t, method="trapezoid", solver="newton", return_info=True)
        row["iterations"], row["windows"] = info.iterations, info.windows
    if "parallel" in outs and "sequential" in outs:
        seq = outs["sequential"]
        row["|par - seq|"] = (outs["parallel"][:seq.shape[0]] - seq).abs().max().item()
    return row


def fmt(row: dict, name: str) -> str:
    v = row.get(name)
    if v is None:
        return "skip" if name in row else "-"
    return ("~" if row.get(name + " ~") else "") + f"{v:.3g}"


def speed(row: dict, name: str) -> str:
    if row.get("parallel") is None or row.get(name) is None:
        return "-"
    return ("~" if row.get(name + " ~") else "") + f"{row[name] / row['parallel']:.1f}x"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {1e3, 1e4}, B = 1: about 20 s")
    p.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-steps", type=int, default=None,
                   help="steps a loop runs before it is extrapolated (default 1e4; quick 1e3)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="skip a parallel run estimated above this many seconds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop_steps is None:
        args.loop_steps = 500 if args.quick else 10_000
    lengths = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    batches = [1] if args.quick else [1, 16]
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    names = ["parallel", "sequential", "rk4 loop"]
    try:
        import torchdiffeq  # noqa: F401

        names.append("torchdiffeq")
    except ImportError:
        print("(torchdiffeq is not installed: its column is left out)", file=sys.stderr)
    print(f"# benchmarks/ode.py on {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {datetime.date.today()}; MLP field D = {D}, hidden {HIDDEN}, "
          f"{args.dtype}, trapezoid, default tol\n")
    rows, history = [], {}
    for backward in passes:
        for B in batches:
            for T in lengths:
                print(f"  T = {T:,}, B = {B}, {'fwd+bwd' if backward else 'fwd'} ...",
                      file=sys.stderr, flush=True)
                rows.append(measure(T, B, backward, names, args, history))
    headers = ["pass", "B", "T", "parallel (s)", "iterations", "windows",
               *(f"{n} (s)" for n in names[1:]), *(f"vs {n}" for n in names[1:]),
               "|par - seq|"]
    table = [[r["pass"], r["B"], f"{r['T']:,}", fmt(r, "parallel"), r.get("iterations", "-"),
              r.get("windows", "-"), *(fmt(r, n) for n in names[1:]),
              *(speed(r, n) for n in names[1:]),
              f"{r['|par - seq|']:.1e}" if "|par - seq|" in r else "-"] for r in rows]
    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for line in table:
            print("| " + " | ".join(str(c) for c in line) + " |")
    else:
        print(format_table(headers, table))
    print("\nvs X: X's time / parallel's time (> 1: parallel is faster); ~: extrapolated from "
          f"the first {args.loop_steps:,} steps; skip: estimated over {args.budget:g} s; "
          "|par - seq|: max difference on the steps both ran (the tolerance is per step: up to "
          "steps x tol apart).")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(headers)
            w.writerows(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
