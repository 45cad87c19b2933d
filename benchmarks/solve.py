"""GRU over long sequences: paraseq.solve_recurrence's methods against the plain loop and
torch.nn.GRU, forward and forward+backward.

    python benchmarks/solve.py                 # the grid in benchmarks/README.md
    python benchmarks/solve.py --quick         # a smoke run (seconds)
    python benchmarks/solve.py --markdown --csv solve.csv
    python benchmarks/solve.py --passes fwd+bwd     # training only
    python benchmarks/solve.py --jacobian both --hidden 8 32 --lengths 10000 --batches 1 16 \
        --passes fwd --threads 1

Each cell: a torch.nn.GRUCell(D, D) (input size = hidden size) in float32 on inputs (B, T, D).
Timings are medians after one warm-up run. "loop" is solve_recurrence(method="sequential"),
one GRUCell call per step; torch.nn.GRU gets the same weights. A method whose time,
extrapolated linearly in T from the previous length, would exceed --budget seconds is not
run and is shown as "skip".

--jacobian analytic | autograd | both: the cell is instead paraseq.cells.GRUCell with the same
weights, and newton and quasi_newton run with ``jacobian=`` each source asked for: the cells'
closed-form Jacobians against the generic ones (torch.func: D vector-Jacobian products per row
for newton, the diagonal of those for quasi_newton) on the same cell, all in solve_recurrence's
general loop (``paraseq.solve.api.COMPILED_CELLS = False``: paraseq's cells would otherwise take
the compiled loop and Newton sweeps). The default ("auto") keeps torch.nn.GRUCell, which has
no analytic Jacobian, so autograd.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq import solve_recurrence
from paraseq.bench import cpu_name, format_table, time_call
from paraseq.bench.timing import PASSES
from paraseq.cells import GRUCell

METHODS = ["newton", "quasi_newton", "auto"]


def columns(jacobian: str) -> list[tuple[str, str, str]]:
    """(label, method, jacobian source) of the solve_recurrence columns."""
    if jacobian == "auto":
        return [(m, m, "auto") for m in METHODS]
    sources = ["analytic", "autograd"] if jacobian == "both" else [jacobian]
    return [(f"{m} [{j}]", m, j) for m in ("newton", "quasi_newton") for j in sources]


def gru_pair(D: int, seed: int, analytic: bool = False) -> tuple[torch.nn.Module, torch.nn.GRU]:
    """A GRU cell (torch.nn.GRUCell, or paraseq.cells.GRUCell with analytic Jacobians) and a
    torch.nn.GRU with the same weights."""
    torch.manual_seed(seed)
    cell = torch.nn.GRUCell(D, D)
    gru = torch.nn.GRU(D, D, batch_first=True)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(cell.weight_ih)
        gru.weight_hh_l0.copy_(cell.weight_hh)
        gru.bias_ih_l0.copy_(cell.bias_ih)
        gru.bias_hh_l0.copy_(cell.bias_hh)
    if analytic:
        ours = GRUCell(D, D)
        ours.load_state_dict(cell.state_dict())
        cell = ours
    return cell, gru


def run_cell(B: int, D: int, T: int, backward: bool, budget: float, history: dict,
             repeats: int, cols: list[tuple[str, str, str]], analytic: bool) -> list[dict]:
    cell, gru = gru_pair(D, seed=T + D + B, analytic=analytic)
    spec = {label: (method, jac) for label, method, jac in cols}
    x = torch.randn(B, T, D, requires_grad=backward)  # (B, T, D)
    with torch.no_grad():
        ref = solve_recurrence(cell, x, method="sequential")  # (B, T, D)

    def solve(name: str, **kw):
        method, jac = spec.get(name, ("sequential", "auto"))
        return solve_recurrence(cell, x, method=method, jacobian=jac, **kw)

    def job(name: str):
        def fwd():
            if name == "torch.nn.GRU":
                return gru(x)[0]
            return solve(name)

        if not backward:
            def f():
                with torch.no_grad():
                    return fwd()
            return f

        def fb():
            out = fwd()
            out.sum().backward()
            return out
        return fb

    rows = []
    for name in ["loop", "torch.nn.GRU", *spec]:
        key = (name, B, D, backward)
        prev = history.get(key)
        if prev is not None and prev[1] * T / prev[0] > budget:
            rows.append(dict(method=name, time=None, est=prev[1] * T / prev[0]))
            continue
        reps = repeats if prev is None or prev[1] * T / prev[0] < budget / 5 else 1
        timing = time_call(job(name), repeats=reps, warmup=1 if reps > 1 else 0)
        history[key] = (T, timing.median)
        chosen = iters = ""
        err = float("nan")
        if name not in ("loop",):
            # the same grad mode as the timed pass: auto's choice depends on it
            with torch.set_grad_enabled(backward):
                if name == "torch.nn.GRU":
                    out = gru(x)[0]
                else:
                    out, info = solve(name, return_info=True)
                    chosen, iters = info.method, info.iterations
                err = (out.detach() - ref).abs().max().item()
        rows.append(dict(method=name, time=timing.median, err=err, chosen=chosen, iters=iters))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: T = 1e3, D in {1, 8}")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds one measurement may take (estimated) before it is skipped")
    p.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both",
                   help="forward only, forward+backward, or both (default)")
    p.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    p.add_argument("--csv", type=Path, help="write one row per (cell, method) here")
    p.add_argument("--jacobian", choices=["auto", "analytic", "autograd", "both"],
                   default="auto", help="auto: torch.nn.GRUCell (autograd Jacobians), as the "
                   "tables in the README; otherwise paraseq.cells.GRUCell with newton and "
                   "quasi_newton on the analytic Jacobians, the autograd ones, or both")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default 1 8 32 64)")
    p.add_argument("--lengths", type=int, nargs="+", help="T values (default 1e3 1e4 1e5)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 16)")
    p.add_argument("--threads", type=int, help="torch and numba threads (default: theirs); 1 "
                   "keeps timings stable on a loaded machine")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba
            numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    hidden = args.hidden or ([1, 8] if args.quick else [1, 8, 32, 64])
    lengths = args.lengths or ([1000] if args.quick else [1000, 10_000, 100_000])
    batches = args.batches or ([1, 16] if not args.quick else [1])
    repeats = 3 if args.quick else 5
    cols = columns(args.jacobian)
    labels = [c[0] for c in cols]
    analytic = args.jacobian != "auto"
    if analytic:  # compare the Jacobian sources inside the general loop, not the kernels
        # that paraseq's own cells would otherwise take (compiled loop / Newton sweeps)
        import paraseq.solve.api

        paraseq.solve.api.COMPILED_CELLS = False
    load = ", load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) \
        if hasattr(os, "getloadavg") else ""
    print(f"# paraseq benchmarks/solve.py on {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}{load}")
    cell_name = "paraseq.cells.GRUCell" if analytic else "torch.nn.GRUCell"
    print(f"# float32 GRU ({cell_name}), input size = hidden size; time in ms (median); "
          "speedups over torch.nn.GRU; err = max |h - loop|")
    records, table = [], []
    history: dict = {}
    passes = PASSES[args.passes]
    for backward in passes:
        for D in hidden:
            for B in batches:
                for T in lengths:
                    rows = run_cell(B, D, T, backward, args.budget, history, repeats, cols,
                                    analytic)
                    by = {r["method"]: r for r in rows}
                    t_gru = by["torch.nn.GRU"]["time"]

                    def cell_text(r, t_gru=t_gru):
                        if r["time"] is None:
                            return f"skip (~{r['est']:.0f} s)"
                        s = f"{r['time'] * 1e3:.1f}"
                        if r["method"] != "torch.nn.GRU" and t_gru:
                            s += f" ({t_gru / r['time']:.2f}x)"
                        return s

                    tail = []
                    if "auto" in by:
                        auto = by["auto"]
                        tail = [auto.get("chosen", ""), "" if auto["time"] is None else
                                f"{auto.get('err', float('nan')):.1e}"]
                    elif args.jacobian == "both":  # autograd time / analytic time
                        for m in ("newton", "quasi_newton"):
                            a, g = by[f"{m} [analytic]"], by[f"{m} [autograd]"]
                            tail.append(f"{g['time'] / a['time']:.2f}x" if a["time"] and
                                        g["time"] else "")
                    else:
                        tail = [f"{max(by[c]['err'] for c in labels if by[c]['time']):.1e}"]
                    table.append([
                        "fwd+bwd" if backward else "fwd", D, B, f"{T:.0e}",
                        *(cell_text(by[m]) for m in ["loop", "torch.nn.GRU", *labels]),
                        *tail,
                    ])
                    print(" | ".join(str(c) for c in table[-1]), file=sys.stderr, flush=True)
                    for r in rows:
                        records.append(dict(pass_="fwd+bwd" if backward else "fwd", hidden=D,
                                            batch=B, T=T, **r))
    tail = ["auto chose", "auto err"] if "auto" in labels else \
        ["newton analytic gain", "quasi_newton analytic gain"] if args.jacobian == "both" \
        else ["max err"]
    headers = ["pass", "hidden", "batch", "T", "loop", "torch.nn.GRU", *labels, *tail]
    print(format_table(headers, table, args.markdown))
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["pass_", "hidden", "batch", "T", "method",
                                               "time", "est", "err", "chosen", "iters"])
            w.writeheader()
            for r in records:
                w.writerow({k: r.get(k, "") for k in w.fieldnames})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
