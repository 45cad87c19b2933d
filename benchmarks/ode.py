"""A neural ODE over long time grids: paraseq.odeint in parallel against the same scheme stepped
in time, an explicit RK4 loop, and torchdiffeq's fixed-grid RK4 when it is installed.

    python benchmarks/ode.py                 # the grid in benchmarks/README.md
    python benchmarks/ode.py --quick         # a smoke run (a few seconds)
    python benchmarks/ode.py --markdown --csv ode.csv

The workload, the columns and the timing rules are those of ``paraseq.bench.ode`` (the same
code runs as the odeint section of ``python -m paraseq bench``); this script adds the knobs:
dtype, threads, the loop prefix and the skip budget.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq.bench import ode as bench_ode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 1e3, B = 1: a few seconds")
    p.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-steps", type=int, default=None,
                   help="steps a loop runs before it is extrapolated (default 1e4; quick 50)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="skip a parallel run estimated above this many seconds")
    p.add_argument("--lengths", type=int, nargs="+", help="grid steps T (overrides the grid)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes B (overrides)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(bench_ode.QUICK if args.quick else bench_ode.FULL)
    grid["T"] = tuple(args.lengths or grid["T"])
    grid["batch"] = tuple(args.batches or grid["batch"])
    loop_steps = args.loop_steps or grid["loop_steps"]
    if min(grid["T"]) < 1 or min(grid["batch"]) < 1 or loop_steps < 1 or args.repeats < 1:
        p.error("--lengths, --batches, --loop-steps and --repeats must be >= 1")
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    names = bench_ode.solver_names()
    if "torchdiffeq" not in names:
        print("(torchdiffeq is not installed: its column is left out)", file=sys.stderr)
    dtype = getattr(torch, args.dtype)
    print(f"# benchmarks/ode.py: {bench_ode.header(dtype)}\n")

    def progress(i: int, n: int, label: str) -> None:
        if i < n:
            print(f"  {label} ...", file=sys.stderr, flush=True)

    rows = bench_ode.run(grid["T"], grid["batch"], passes, names, progress=progress,
                         dtype=dtype, repeats=args.repeats, loop_steps=loop_steps,
                         budget=args.budget)
    print(bench_ode.table(rows, names, args.markdown))
    print("\n" + bench_ode.notes(loop_steps, args.budget))
    if args.csv:
        bench_ode.write_csv(rows, names, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
