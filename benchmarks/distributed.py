"""paraseq.distributed: strong scaling at P = 1 and 2 local gloo processes, and a cost model.

    python benchmarks/distributed.py            # T = 1e6 (a few minutes)
    python benchmarks/distributed.py --T 100000 --repeats 2

Each process runs one torch thread. Measured, per P: the distributed linear_scan (diagonal,
float32, D = 16), a quasi-Newton solve of paraseq.cells.DiagGRUCell(2, 16) and a Newton solve
of paraseq.cells.GRUCell(2, 4) (dense 4 x 4 Jacobians), float32, batch 1; the time is the
slowest rank's, median of ``--repeats``; the bytes each rank contributed to the all-gathers.

The cost model (per solve; T_r = T / P steps per rank, k iterations):
    t(P) = (k + 1) * max_r [T_r (L + R + S (1 + [r > 0]) + M [0 < r < P - 1])]
           + 2 T_r (E + R) + (k + 6) * (alpha_P + bytes * (P - 1) * beta)
L: linearisation (f and the Jacobian) and the right-hand side per step; R: the residual,
the clipping of the iterate and the shift per step; S: the local scan per step (rank 0
scans once, the others twice: from zero and the fix-up); M: the chunk product per step
(only ranks strictly inside the order); E: one cell evaluation per step (the first guess and
the final check); alpha, beta: all-gather latency and inverse bandwidth; k + 6 exchanges:
one per iteration (k + 1 scans) plus the shape check, h0, the first guess's boundary, the
solution's boundary and the final residual. L, R, S, M, E are measured in the P = 1 process
right after its solves (the same load); alpha and beta from all-gathers between the two
processes. The same formula with other alpha, beta and per-step costs predicts other
machines (see ``_predict``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paraseq.distributed.launch import run_local


def _bounds(T: int, P: int, rank: int) -> tuple[int, int]:
    return T * rank // P, T * (rank + 1) // P


def _problems(T: int):
    from paraseq.cells import DiagGRUCell, GRUCell

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, 2, generator=g)  # (B, T, n)
    return {"DiagGRU(16) quasi_newton": (DiagGRUCell(2, 16), "quasi_newton", x),
            "GRU(4) newton": (GRUCell(2, 4), "newton", x)}


def _job(rank: int, P: int, T: int, repeats: int) -> dict:
    import torch.distributed as dist

    from paraseq.distributed import linear_scan
    from paraseq.distributed.solve import _solve

    out: dict = {}
    g = torch.Generator().manual_seed(0)
    a = 0.5 + 0.5 * torch.rand(1, T, 16, generator=g)  # (B, T, D)
    b = torch.randn(1, T, 16, generator=g)
    s, e = _bounds(T, P, rank)
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        linear_scan(a[:, s:e], b[:, s:e])
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)
    out["scan"] = statistics.median(times)
    for name, (cell, method, x) in _problems(T).items():
        times = []
        for i in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                _, info, comm = _solve(cell, x[:, s:e], None, group=None, method=method,
                                       tol=None, max_iter=None, jacobian="auto",
                                       on_failure="fallback")
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
        per_iter = [nb for what, nb in comm.log if what.startswith("iteration")]
        out[name] = (statistics.median(times), info.iterations, statistics.mean(per_iter),
                     comm.exchanges)
    if P == 1:  # the per-step costs, in this process, under the load the solves just saw
        out["components"] = _components(T, repeats)
    # all-gather latency and bandwidth between the processes
    for n in (1, 1 << 16):
        buf = torch.zeros(n, dtype=torch.float64)
        outs = [torch.empty_like(buf) for _ in range(P)]
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            dist.all_gather(outs, buf)
            ts.append(time.perf_counter() - t0)
        out[f"gather{n}"] = statistics.median(ts)
    return out


def _components(T: int, repeats: int) -> dict:
    """L, S, M, E per step, one process, one thread."""
    from paraseq import linear_scan
    from paraseq.distributed.scan import chunk_product
    from paraseq.solve.cell import FlatCell, StateLayout
    from paraseq.solve.iterate import _lin, _sanitize, evaluate, residual_map, shift
    from paraseq.solve.methods import METHODS

    torch.set_num_threads(1)

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / T

    comp = {}
    for name, (cell, method, x) in _problems(T).items():
        D = cell.hidden_size
        fc = FlatCell(cell, StateLayout((D,), False))
        H = 0.1 * torch.randn(1, T, D)
        Hp = shift(H, torch.zeros(1, D))
        m = METHODS[method]
        with torch.no_grad():
            F, A = _lin(fc, m, "analytic", x, Hp, torch.float32, 8, None)
            dense = A.dim() == 4
            rhs = F - (torch.matmul(A, Hp.unsqueeze(-1)).squeeze(-1) if dense else A * Hp)

            def lin(fc=fc, m=m, x=x, Hp=Hp, dense=dense):
                F, A = _lin(fc, m, "analytic", x, Hp, torch.float32, 8, None)
                return F - (torch.matmul(A, Hp.unsqueeze(-1)).squeeze(-1) if dense else A * Hp)

            comp[name] = {"L": med(lin),
                          "S": med(lambda A=A, rhs=rhs: linear_scan(A, rhs)),
                          "M": med(lambda A=A, dense=dense: chunk_product(A, dense, False)),
                          "E": med(lambda fc=fc, x=x, Hp=Hp: evaluate(fc, x, Hp)),
                          "R": med(lambda H=H, F=F: (float(residual_map(H, F).max()),
                                                     _sanitize(H.clone()),
                                                     shift(H, H[:, 0]))),
                          "dense": dense, "D": D}
    a = torch.rand(1, T, 16)
    b = torch.randn(1, T, 16)
    comp["scan"] = {"S": med(lambda: linear_scan(a, b)), "M": med(lambda: a.prod(dim=-2))}
    return comp


def _model(c: dict, T: int, P: int, k: int, alpha: float, beta: float, nbytes: int) -> float:
    """Predicted seconds of one solve (see the module docstring)."""
    Tr = T / P
    work = max(Tr * (c["L"] + c["R"] + c["S"] * (1 + (r > 0)) + c["M"] * (0 < r < P - 1))
               for r in range(P))
    comm = alpha + nbytes * (P - 1) * beta if P > 1 else 0.0
    return (k + 1) * work + 2 * Tr * (c["E"] + c["R"]) + (k + 6) * comm


def _model_scan(c: dict, T: int, P: int, alpha: float, beta: float, nbytes: int) -> float:
    Tr = T / P
    work = max(Tr * (c["S"] * (1 + (r > 0)) + c["M"] * (0 < r < P - 1)) for r in range(P))
    comm = 2 * (alpha + nbytes * (P - 1) * beta) if P > 1 else 0.0  # the check + the summaries
    return work + comm


def _predict(comp: dict, T: int, k: int, name: str) -> list[str]:
    """Predicted parallel efficiency on other machines, from the same formula. Assumed (not
    measured here): NVLink (8 GPUs): alpha 30 us, 150 GB/s, per-step costs 100x below this
    CPU thread's; a network (64 CPU ranks like this one's threads, 100 Gb/s): a ring
    all-gather, alpha 15 us per hop (63 hops), 12.5 GB/s."""
    c = comp[name]
    D = c["D"]
    nbytes = 4 * (1 + (D * D if c["dense"] else D) + D)
    lines = []
    for label, P, scale, alpha, beta in (
            ("8 GPUs, NVLink", 8, 0.01, 30e-6, 1 / 150e9),
            ("64 ranks, network", 64, 1.0, 63 * 15e-6, 1 / 12.5e9)):
        cs = {kk: (v * scale if kk in "LSMER" else v) for kk, v in c.items()}
        t1 = _model(cs, T, 1, k, 0, 0, nbytes)
        tP = _model(cs, T, P, k, alpha, beta, nbytes)
        lines.append(f"| {name} | {label} | {P} | {t1 / (P * tP):.2f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    T = args.T
    load = os.getloadavg()
    print(f"T = {T:,}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
          f"{os.cpu_count()} cores; torch {torch.__version__}\n")
    runs = {P: run_local(_job, P, T, args.repeats, threads=1, timeout_s=3600,
                         collective_timeout_s=1800) for P in (1, 2)}
    comp = runs[1][0]["components"]
    # the slowest rank's time per P
    alpha = runs[2][0]["gather1"]
    big = runs[2][0]["gather65536"]
    beta = max(big - alpha, 0.0) / (65536 * 8)
    print(f"all-gather between 2 processes: latency {alpha * 1e6:.0f} us, "
          f"{1 / beta / 1e9 if beta else float('inf'):.2f} GB/s\n")
    print("| work | P = 1 (s) | P = 2 (s) | efficiency | model P = 1 | model P = 2 | "
          "iterations P=1/P=2 | bytes per rank per iteration (measured / model) |")
    print("|---|---|---|---|---|---|---|---|")
    t1 = max(r["scan"] for r in runs[1])
    t2 = max(r["scan"] for r in runs[2])
    c = comp["scan"]
    nb = 4 * (16 + 16)
    print(f"| linear_scan diag D=16 | {t1:.3f} | {t2:.3f} | {t1 / (2 * t2):.2f} | "
          f"{_model_scan(c, T, 1, 0, 0, nb):.3f} | {_model_scan(c, T, 2, alpha, beta, nb):.3f} "
          f"| - | {nb} / {nb} |")
    for name in _problems(8):
        m1 = max(r[name][0] for r in runs[1])
        m2 = max(r[name][0] for r in runs[2])
        k1, k2 = runs[1][0][name][1], runs[2][0][name][1]
        c = comp[name]
        D = c["D"]
        model_bytes = 4 * (1 + (D * D if c["dense"] else D) + D)
        # measured: the payload rank 1 contributed to each iteration's all-gather
        per_iter = runs[2][1][name][2]
        print(f"| {name} | {m1:.2f} | {m2:.2f} | {m1 / (2 * m2):.2f} | "
              f"{_model(c, T, 1, k1, 0, 0, model_bytes):.2f} | "
              f"{_model(c, T, 2, k2, alpha, beta, model_bytes):.2f} | {k1}/{k2} | "
              f"{per_iter:.0f} / {model_bytes} |")
    print("\nper-step costs (one thread, ns): " + "; ".join(
        f"{n}: " + ", ".join(f"{kk} {v * 1e9:.0f}" for kk, v in c.items() if kk in "LSMER")
        for n, c in comp.items()))
    print("\n| work | machine (assumed) | P | predicted efficiency |\n|---|---|---|---|")
    for name in _problems(8):
        for line in _predict(comp, T, runs[2][0][name][1], name):
            print(line)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
