"""method="auto"'s guard: on an Elman cell (torch.nn.RNNCell, hidden 8) swept from contracting
to chaotic, the time of solve_recurrence with auto, the loop and forced Newton, interleaved,
median of repeats, one torch thread; and what auto picked and the exponent it read.

    python benchmarks/diagnostics.py [--quick] [--length T] [--repeats R]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paraseq
from paraseq.bench import cpu_name, format_table


def cell_of(gain: float, D: int = 8) -> torch.nn.RNNCell:
    torch.manual_seed(0)
    cell = torch.nn.RNNCell(2, D)
    with torch.no_grad():
        cell.weight_hh.copy_(gain * torch.randn(D, D) / math.sqrt(D))
    return cell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 2000, 3 repeats")
    p.add_argument("--length", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    T, reps = (2000, 3) if args.quick else (args.length, args.repeats)
    torch.set_num_threads(1)
    print(f"paraseq {paraseq.__version__}, {cpu_name()}, load average "
          f"{os.getloadavg()[0]:.1f}; torch.nn.RNNCell(2, 8), batch 1, T = {T:,}, float32, "
          f"median of {reps}\n")
    rows = []
    for gain in (0.5, 1.0, 1.5, 2.0, 3.0):
        cell = cell_of(gain)
        x = 0.1 * torch.randn(1, T, 2, generator=torch.Generator().manual_seed(1))
        lle = paraseq.diagnostics.lyapunov(cell, x[:, :2000]).exponent.item()
        times: dict[str, list[float]] = {"auto": [], "sequential": [], "newton": []}
        infos = {}
        with torch.no_grad():
            for r in range(reps + 1):  # the first round warms up, and is not counted
                for m in times:
                    t0 = time.perf_counter()
                    _, infos[m] = paraseq.solve_recurrence(cell, x, method=m, return_info=True)
                    if r:
                        times[m].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        auto = infos["auto"]
        newton = infos["newton"]
        rows.append([f"{gain:.1f}", f"{lle:+.3f}",
                     "-" if auto.lle is None else f"{auto.lle:+.3f}", auto.method,
                     f"{med['auto'] * 1e3:.0f}", f"{med['sequential'] * 1e3:.0f}",
                     f"{med['newton'] * 1e3:.0f}",
                     f"{newton.iterations}" + (" (fell back)" if newton.fell_back else ""),
                     f"{med['auto'] / med['sequential']:.2f}"])
    print(format_table(["gain", "LLE", "auto's LLE", "auto picks", "auto ms", "loop ms",
                        "newton ms", "newton iters", "auto / loop"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
