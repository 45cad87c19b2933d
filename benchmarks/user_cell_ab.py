"""A user-written GRU by newton [compiled], timed in process CPU time (less sensitive than wall
time to other processes on a shared machine), optionally A/B against one of paraseq's CPU
choices switched off.

    python benchmarks/user_cell_ab.py                      # issue 16's four workloads
    python benchmarks/user_cell_ab.py --ab heap            # freed memory kept vs not
    python benchmarks/user_cell_ab.py --ab pass            # with/without solve._graph_pass
    python benchmarks/user_cell_ab.py --workloads 32,16,10000 --repeats 5

Run at two commits to compare them (the numbers in benchmarks/README.md name the commits).
With ``--ab``, each arm runs ``--repeats`` solves back to back (as a training loop does: the
heap's retention carries from one solve to the next), in blocks A, B, A, B; the median of each
arm's timed solves is printed. A block that changes the compiled functions' options clears
paraseq's compiled cache and pays its compilation in an untimed warm-up. One thread.
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
from paraseq.solve import jit

_OPTIONS = jit._options


def _defaults() -> None:
    _heap.ENABLED = True
    if jit._options is not _OPTIONS:
        jit._options = _OPTIONS
        jit.clear()


def _heap_off() -> None:
    _defaults()
    _heap.ENABLED = False
    _heap.release()


def _options_without(option: str):
    def setup() -> None:
        _defaults()
        jit._options = lambda D: {k: v for k, v in _OPTIONS(D).items() if k != option}
        jit.clear()
    return setup


ARMS = {
    "none": [("newton [compiled]", _defaults)],
    "heap": [("heap kept", _defaults), ("not kept", _heap_off)],
    "pass": [("with the pass", _defaults),
             ("without", _options_without("post_grad_custom_pre_pass"))],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=None, help="hidden,batch,T triples")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ab", choices=list(ARMS), default="none")
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

        arms = ARMS[args.ab]
        times: dict[str, list[float]] = {name: [] for name, _ in arms}
        with torch.no_grad():
            for _ in range(2 if len(arms) > 1 else 1):
                for name, setup in arms:
                    setup()
                    run()  # warm-up (compiles where the options changed)
                    for _ in range(args.repeats):
                        t0 = time.process_time()
                        run()
                        times[name].append(time.process_time() - t0)
        ARMS["none"][0][1]()  # back to paraseq's defaults
        med = {a: sorted(v)[len(v) // 2] * 1e3 for a, v in times.items()}
        print(f"hidden {D}, batch {B}, T {T}: "
              + ", ".join(f"{name} {ms:.0f} ms" for name, ms in med.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
