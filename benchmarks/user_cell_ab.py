"""A user-written GRU by newton [compiled], timed in process CPU time (less sensitive than wall
time to other processes on a shared machine), optionally A/B against paraseq._heap off.

    python benchmarks/user_cell_ab.py                      # issue 16's four workloads
    python benchmarks/user_cell_ab.py --ab heap            # freed memory kept vs not, interleaved
    python benchmarks/user_cell_ab.py --workloads 32,16,10000 --repeats 5

Run at two commits to compare them (the numbers in benchmarks/README.md name the commits).
Median of ``--repeats`` after a warm-up (the warm-up pays the compilation), one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from any_cell import WORKLOADS, make_cell

from paraseq import _heap, solve_recurrence


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=None, help="hidden,batch,T triples")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ab", choices=["none", "heap"], default="none")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loads = ([tuple(int(v) for v in w.split(",")) for w in args.workloads] if args.workloads
             else WORKLOADS)
    print(f"# load average {os.getloadavg()[0]:.1f}; process CPU ms, median of {args.repeats}")
    for D, B, T in loads:
        cell = make_cell("gru", D, D * 1000 + B + T)
        x, h0 = torch.randn(B, T, D), torch.zeros(B, D)

        def run(cell=cell, x=x, h0=h0) -> None:
            solve_recurrence(cell, x, h0, method="newton", jacobian="compiled",
                             on_cost="ignore")

        arms = (True, False) if args.ab == "heap" else (True,)
        times: dict[bool, list[float]] = {a: [] for a in arms}
        with torch.no_grad():
            run()
            for _ in range(args.repeats):
                for arm in arms:
                    _heap.ENABLED = arm
                    t0 = time.process_time()
                    run()
                    times[arm].append(time.process_time() - t0)
        _heap.ENABLED = True
        med = {a: sorted(v)[len(v) // 2] * 1e3 for a, v in times.items()}
        if args.ab == "heap":
            print(f"hidden {D}, batch {B}, T {T}: heap kept {med[True]:.0f} ms, "
                  f"not kept {med[False]:.0f} ms")
        else:
            print(f"hidden {D}, batch {B}, T {T}: {med[True]:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
