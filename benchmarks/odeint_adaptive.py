"""The adaptive parallel odeint against torchdiffeq's dopri5 at the same tolerance: time and
error against a tight scipy solve_ivp reference, in one run.

    python benchmarks/odeint_adaptive.py             # the table in benchmarks/README.md
    python benchmarks/odeint_adaptive.py --quick     # CI's smoke run (short spans, 1 repeat)
    python benchmarks/odeint_adaptive.py --markdown

Workloads: the MLP neural ODE of ``python -m paraseq bench --sections ode``
(``paraseq.bench.ode.Field``: D = 4, hidden 32, a batch of B initial conditions) over a span
of time units, and Van der Pol (mu = 1, and mu = 1000: stiff, so an explicit method's step is
held to its stability limit). Both solvers get the same rtol/atol and method dopri5; paraseq
solves its grid by Newton over the whole grid (``solver="newton"``) and refines the grid in
rounds, torchdiffeq steps in time. Error: the largest absolute difference at the output times
from scipy's solve_ivp (DOP853, or Radau for the stiff case, rtol 1e-12, atol 1e-14). Times:
candidate and baseline interleaved, the median of ``--repeats`` runs after one warm-up, one
torch thread; the load average is printed (timings on a shared machine are noisy: compare
ratios within one run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paraseq
from paraseq.bench.ode import Field

F64 = torch.float64


class VanDerPol(torch.nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = mu

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


class Counted(torch.nn.Module):
    """Counts func's calls (torchdiffeq's evaluations; paraseq's are batched, not counted)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.calls = f, 0

    def forward(self, t, y):
        self.calls += 1
        return self.f(t, y)


def reference(f, y0: torch.Tensor, t: torch.Tensor, stiff: bool) -> torch.Tensor:
    from scipy.integrate import solve_ivp

    shape = y0.shape

    def rhs(s, u):
        with torch.no_grad():
            y = torch.as_tensor(u, dtype=F64).reshape(shape)
            return f(torch.tensor(s, dtype=F64), y).reshape(-1).numpy()

    sol = solve_ivp(rhs, (float(t[0]), float(t[-1])), y0.reshape(-1).numpy(),
                    method="Radau" if stiff else "DOP853", t_eval=t.numpy(), rtol=1e-12,
                    atol=1e-14)
    return torch.as_tensor(np.ascontiguousarray(sol.y.T), dtype=F64).reshape(len(t), *shape)


def cases(quick: bool):
    torch.manual_seed(0)
    mlp = Field().double()
    for p in mlp.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    out = []
    for B in (1, 16):
        y0 = torch.randn(B, 4, generator=g, dtype=F64)
        for span in ((10.0,) if quick else (10.0, 100.0)):
            out.append((f"MLP B={B} t in [0, {span:g}]", mlp, y0, span, 11, False))
    out.append(("Van der Pol mu=1 t in [0, 20]" if not quick else
                "Van der Pol mu=1 t in [0, 5]", VanDerPol(1.0),
                torch.tensor([2.0, 0.0], dtype=F64), 5.0 if quick else 20.0, 11, False))
    span = 0.1 if quick else 1.0
    out.append((f"Van der Pol mu=1000 t in [0, {span:g}]", VanDerPol(1000.0),
                torch.tensor([2.0, 0.0], dtype=F64), span, 11, True))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short spans, one repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-8)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    try:
        import torchdiffeq
    except ImportError:
        torchdiffeq = None
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    print(f"# odeint adaptive (dopri5, rtol {args.rtol:g}, atol {args.atol:g}), float64, "
          f"1 thread, torch {torch.__version__}, {datetime.date.today()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    head = ["workload", "paraseq ms", "torchdiffeq ms", "speed-up", "paraseq err",
            "torchdiffeq err", "paraseq grid (rounds)", "torchdiffeq evals"]
    rows = []
    for name, f, y0, span, T, stiff in cases(args.quick):
        t = torch.linspace(0, span, T, dtype=F64)
        ref = reference(f, y0, t, stiff)
        kw = dict(rtol=args.rtol, atol=args.atol, method="dopri5")

        def ours(f=f, y0=y0, t=t, kw=kw):
            with torch.no_grad():
                return paraseq.odeint(f, y0, t, solver="newton", return_info=True, **kw)

        counted = Counted(f)

        def theirs(counted=counted, y0=y0, t=t, kw=kw):
            with torch.no_grad():
                return torchdiffeq.odeint(counted, y0, t, **kw)

        runs = [ours] + ([theirs] if torchdiffeq else [])
        for run in runs:  # warm-up
            run()
        times: list[list[float]] = [[] for _ in runs]
        for _ in range(repeats):
            for i, run in enumerate(runs):  # interleaved
                t0 = time.perf_counter()
                run()
                times[i].append(time.perf_counter() - t0)
        y, info = ours()
        ms = [1e3 * statistics.median(ts) for ts in times]
        err = float((y - ref).abs().max())
        grid = f"{info.steps} ({info.rounds})"
        if torchdiffeq:
            counted.calls = 0
            yt = theirs()
            rows.append([name, f"{ms[0]:.1f}", f"{ms[1]:.1f}", f"{ms[1] / ms[0]:.2f}x",
                         f"{err:.1e}", f"{float((yt - ref).abs().max()):.1e}", grid,
                         str(counted.calls)])
        else:
            rows.append([name, f"{ms[0]:.1f}", "-", "-", f"{err:.1e}", "-", grid, "-"])
        print("  " + " | ".join(rows[-1]), flush=True)
    print()
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
