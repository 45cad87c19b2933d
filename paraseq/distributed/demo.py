"""``python -m paraseq demo --distributed N``: N local gloo processes, the time dim split
across them, each rank's result against the single-process one, with the time per rank."""

from __future__ import annotations

import time

import torch

from .launch import run_local

__all__ = ["run_demo"]


def _bounds(T: int, P: int, rank: int) -> tuple[int, int]:
    return T * rank // P, T * (rank + 1) // P


def _job(rank: int, P: int, T_scan: int, T_gru: int, seed: int) -> dict:
    import paraseq
    from paraseq.cells import GRUCell

    from . import linear_scan, solve_recurrence

    out = {}
    g = torch.Generator().manual_seed(seed)
    # every rank draws the whole problem (the same seed) and keeps its slice
    a = 0.9 + 0.1 * torch.rand(4, T_scan, 16, generator=g, dtype=torch.float64)  # (B, T, D)
    b = torch.randn(4, T_scan, 16, generator=g, dtype=torch.float64)
    s, e = _bounds(T_scan, P, rank)
    linear_scan(a[:, s:e], b[:, s:e])  # warm-up (numba kernels, gloo connections)
    t0 = time.perf_counter()
    x = linear_scan(a[:, s:e], b[:, s:e])
    out["scan_s"] = time.perf_counter() - t0
    ref = paraseq.linear_scan(a, b)[:, s:e]
    out["scan_err"] = float((x - ref).abs().max()) if x.numel() else 0.0

    torch.manual_seed(seed)
    cell = GRUCell(2, 8, dtype=torch.float64)
    xs = torch.randn(1, T_gru, 2, generator=g, dtype=torch.float64)  # (B, T, n)
    s, e = _bounds(T_gru, P, rank)
    with torch.no_grad():
        t0 = time.perf_counter()
        H, info = solve_recurrence(cell, xs[:, s:e], group=None, method="newton", tol=1e-10,
                                   return_info=True)
        out["newton_s"] = time.perf_counter() - t0
        ref = paraseq.solve_recurrence(cell, xs, method="sequential")[:, s:e]
    out["newton_err"] = float((H - ref).abs().max()) if H.numel() else 0.0
    out["iterations"] = info.iterations
    out["steps"] = (s, e)
    return out


def run_demo(P: int, length: int = 100_000, gru_length: int = 20_000, seed: int = 0) -> int:
    """Spawn P gloo processes (one thread each) and print the table; 0 if every rank's
    result equals the single-process one (float64, 1e-10), else 1."""
    print(f"paraseq.distributed demo: {P} gloo processes on this machine, one thread each\n"
          f"  linear_scan: diagonal, float64, batch 4, D 16, T {length:,}\n"
          f"  solve_recurrence: paraseq.cells.GRUCell(2, 8), method='newton', float64, "
          f"T {gru_length:,}\n")
    t0 = time.perf_counter()
    res = run_local(_job, P, length, gru_length, seed, threads=1, timeout_s=900,
                    collective_timeout_s=600)
    print(f"{'rank':>4} {'GRU steps':>18} {'scan ms':>9} {'scan err':>9} {'newton s':>9} "
          f"{'iters':>5} {'newton err':>10}")
    for r, o in enumerate(res):
        s, e = o["steps"]
        print(f"{r:>4} {f'{s}..{e - 1}':>18} {o['scan_s'] * 1e3:>9.1f} {o['scan_err']:>9.1e} "
              f"{o['newton_s']:>9.2f} {o['iterations']:>5} {o['newton_err']:>10.1e}")
    worst = max(max(o["scan_err"], o["newton_err"]) for o in res)
    ok = worst <= 1e-10
    print(f"\nlargest difference from the single-process result: {worst:.1e} "
          f"({'equal' if ok else 'NOT equal'} to 1e-10); {time.perf_counter() - t0:.1f} s "
          f"with the spawn")
    return 0 if ok else 1
