"""The ``bench`` subcommand: see ``paraseq.bench.grid``."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch


def register(sub) -> None:
    p = sub.add_parser("bench", help="paraseq.nn.GRU against torch.nn.GRU over a grid, and odeint "
                                     "on a neural ODE (tables, CSV, speedup plot)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (hidden 1 and 8, T = 1e3): well under a minute")
    p.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
    p.add_argument("--out", default="paraseq-out",
                   help="folder for bench.csv and bench_speedup.png (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--budget", type=float, default=10.0,
                   help="seconds of timed runs per measurement, at most (default: %(default)s)")
    p.add_argument("--skip-after", type=float, default=60.0,
                   help="skip a measurement estimated (from the shorter T) above this many "
                        "seconds (default: %(default)s)")
    p.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (overrides the grid's)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths T (overrides)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (overrides)")
    p.add_argument("--markdown", action="store_true", help="print a GitHub markdown table")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the installed peers on the GRU grid's workloads (a jitted "
                        "JAX lax.scan GRU, DEER, pararnn-torch's ParaGRU against DiagGRU; "
                        "paraseq.bench.peers): a second table and more CSV columns (default: "
                        "on when one is installed, off with --quick)")
    # --- the odeint section (paraseq.bench.ode) ---
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="what to run: gru (the GRU grid, bench.csv) and ode (odeint on a "
                        "neural ODE against sequential stepping, an RK4 loop and torchdiffeq "
                        "if installed, bench_ode.csv); --lengths, --batches, --passes, "
                        "--repeats, --markdown and --out apply to both, --skip-after is ode's "
                        "budget (default: gru ode)")
    p.set_defaults(func=run)


SECTIONS = ("gru", "ode")


def run(args: argparse.Namespace) -> int:
    """The sections in order; the first failing one's exit code."""
    from . import ode

    for name, section in (("gru", run_gru), ("ode", ode.cli_section)):
        if name in args.sections:
            code = section(args)
            if code:
                return code
    return 0
# --- end of the odeint section's hook ---


def run_gru(args: argparse.Namespace) -> int:
    from ..cli import _progress
    from .grid import FULL_GRID, QUICK_GRID, geometric_mean, measure, plot, table, workloads
    from .grid import write_csv as save_csv
    from .timing import PASSES, cpu_name, grid_from_args

    if args.repeats < 1 or args.budget <= 0:
        print("error: --repeats must be >= 1 and --budget > 0", file=sys.stderr)
        return 2
    grid = grid_from_args(QUICK_GRID if args.quick else FULL_GRID, args,
                          (("hidden", "hidden"), ("T", "lengths"), ("batch", "batches")))
    if grid is None:
        return 2
    passes = PASSES[args.passes]
    jobs = workloads(grid, passes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"paraseq bench on {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load:.2f}, {datetime.date.today()}")
    print("GRU, input size = hidden, float32; speedup = torch.nn.GRU time / paraseq.nn.GRU "
          "(method='auto') time, measured in this run")
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    peers = None
    if args.peers or (args.peers is None and not args.quick):
        from .peers import detect

        found = detect()
        print("peers: " + "; ".join(info.label for info in found.values()))
        peers = found if any(info.available for info in found.values()) else None
    results, history = [], {}
    t0 = time.perf_counter()
    _progress(0, len(jobs), "")
    for i, w in enumerate(jobs, 1):
        results.append(measure(w, repeats=repeats, budget=args.budget, history=history,
                               skip_after=args.skip_after, peers=peers))
        _progress(i, len(jobs), f"{w.pass_} hidden {w.hidden} batch {w.batch} T {w.T:.0e}")
    print()
    print(table(results, args.markdown))
    for pass_ in sorted({r.pass_ for r in results}):
        sel = [r.speedup for r in results if r.pass_ == pass_]
        worst = min((s for s in sel if s is not None), default=float("nan"))
        print(f"{pass_}: geometric-mean speedup {geometric_mean(sel):.2f}x, worst {worst:.2f}x")
    if peers is not None:  # the peers' columns (paraseq.bench.peers)
        from .grid import peer_summary, peer_table

        print(f"\nPeers on the same workloads, in this run:\n{peer_table(results, args.markdown)}")
        print("\n".join(peer_summary(results)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_csv(results, out / "bench.csv")
    print(f"\nCSV saved to {out / 'bench.csv'}")
    if not args.no_plot:
        path = plot(results, out / "bench_speedup.png")
        if path is not None:
            print(f"plot saved to {path}")
    print(f"bench finished in {time.perf_counter() - t0:.1f} s")
    return 0
