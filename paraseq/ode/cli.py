"""``python -m paraseq ode EXAMPLE``: the worked examples, parallel against sequential and scipy.

Shape letters: T grid points, ``...`` batch dims, D the state size.

Every example is solved by the parallel solver and by the same scheme stepped in time
(``solver="sequential"``), timed (one run each, no warm-up, under ``torch.no_grad``), and both
are compared with scipy.integrate.solve_ivp (DOP853, or Radau for Van der Pol; rtol 1e-10,
atol 1e-12) at the grid points. The observed order is log2(err(h) / err(h/2)) from a second
parallel solve with twice the substeps. When the sequential loop would take more than
``--max-sequential`` steps it runs on a prefix of the grid and its time is extrapolated
(marked ``~``).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cli import _pyplot

EXAMPLES = ("competition", "mathieu", "pendulum", "vanderpol", "lorenz")


@dataclass
class Case:
    name: str
    func: torch.nn.Module
    y0: torch.Tensor  # (..., D)
    t: torch.Tensor  # (T,)
    method: str
    substeps: int = 1
    reference: str = "DOP853"
    order_check: bool = True
    result: dict = field(default_factory=dict)


def register(sub) -> None:
    p = sub.add_parser(
        "ode", help="ODEs solved parallel in time: the worked examples against scipy",
        description="Solve an example by odeint's parallel solver and by the same scheme "
                    "stepped in time; print times, iterations and errors against "
                    "scipy.integrate.solve_ivp; optionally plot it.")
    p.add_argument("example", choices=EXAMPLES)
    p.add_argument("--plot", metavar="PATH", help="save the figure to PATH (png, pdf, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (mathieu's "
                                                          "spot checks)")
    p.add_argument("--points", type=int, default=None,
                   help="grid points T per case (default: per example)")
    p.add_argument("--method", default=None, help="the scheme (default: gauss_legendre_4; "
                                                  "see paraseq.ode.SCHEMES)")
    p.add_argument("--solver", default="newton",
                   help="the parallel solver (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="small grids and batches: every example in seconds")
    p.add_argument("--max-sequential", type=int, default=20_000,
                   help="longest sequential run in steps; longer ones are extrapolated from a "
                        "prefix (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_ode)


def _check_args(args) -> str | None:
    from .api import SOLVERS
    from .schemes import SCHEMES

    if args.method is not None and args.method not in SCHEMES:
        return f"--method must be one of {', '.join(SCHEMES)}; got {args.method!r}"
    parallel = [s for s in SOLVERS if s != "sequential"]
    if args.solver not in parallel:
        return f"--solver must be one of {', '.join(parallel)}; got {args.solver!r}"
    if args.points is not None and args.points < 2:
        return f"--points must be >= 2; got {args.points}"
    if args.max_sequential < 1:
        return f"--max-sequential must be >= 1; got {args.max_sequential}"
    return None


def cmd_ode(args: argparse.Namespace) -> int:
    import sys

    problem = _check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    print(f"paraseq ode {args.example}: float64, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    code = {"competition": _competition, "mathieu": _mathieu, "pendulum": _pendulum,
            "vanderpol": _vanderpol, "lorenz": _lorenz}[args.example](args)
    print(f"\nfinished in {time.perf_counter() - t0:.1f} s")
    return code


# ---------------------------------------------------------------------------- the runner

def _points(args, default: int, quick: int) -> int:
    return args.points if args.points is not None else (quick if args.quick else default)


def _solve(case: Case, solver: str, substeps: int | None = None, t: torch.Tensor | None = None):
    from .api import odeint

    k = case.substeps if substeps is None else substeps
    tt = case.t if t is None else t
    with torch.no_grad():
        start = time.perf_counter()
        y, info = odeint(case.func, case.y0, tt, method=case.method, solver=solver,
                         return_info=True, options={"substeps": k})
        return y, info, time.perf_counter() - start


def _run_case(case: Case, args) -> None:
    """Reference, parallel, sequential and the order check; results into case.result."""
    from .examples import scipy_reference

    r = case.result
    start = time.perf_counter()
    r["ref"] = scipy_reference(case.func, case.y0, case.t, method=case.reference)
    r["ref_time"] = time.perf_counter() - start
    r["par"], r["par_info"], r["par_time"] = _solve(case, args.solver)
    S = (case.t.shape[0] - 1) * case.substeps
    if S <= args.max_sequential:
        r["seq"], r["seq_info"], r["seq_time"] = _solve(case, "sequential")
        r["seq_estimated"] = False
    else:  # a prefix of the grid, its time scaled up
        n = max(2, args.max_sequential // case.substeps + 1)
        _, r["seq_info"], tm = _solve(case, "sequential", t=case.t[:n])
        r["seq"], r["seq_time"], r["seq_estimated"] = None, tm * S / ((n - 1) * case.substeps), \
            True
    r["err"] = float(np.abs(r["par"].numpy() - r["ref"]).max())
    if case.order_check:
        fine, _, _ = _solve(case, args.solver, substeps=2 * case.substeps)
        r["fine"] = fine
        r["err_fine"] = float(np.abs(fine.numpy() - r["ref"]).max())


def _table(cases: list[Case], args) -> None:
    from ..bench import format_table

    rows = []
    for c in cases:
        r = c.result
        pi, si = r["par_info"], r["seq_info"]
        S = pi.steps
        est = "~" if r["seq_estimated"] else ""
        seq_err = "-" if r["seq"] is None else f"{np.abs(r['seq'].numpy() - r['ref']).max():.1e}"
        agree = "-" if r["seq"] is None else f"{(r['par'] - r['seq']).abs().max().item():.1e}"
        order = "-"
        if "err_fine" in r and r["err_fine"] > 1e-8:  # above the reference's own error
            order = f"{math.log2(r['err'] / r['err_fine']):.2f}"
        note = f"fell back at step {pi.fallback_from}" if pi.fell_back else ""
        rows.append([c.name, f"{c.method}", S, f"{est}{r['seq_time']:.2f}", seq_err,
                     f"{r['par_time']:.2f}", f"{est}{r['seq_time'] / r['par_time']:.1f}x",
                     pi.iterations, pi.windows, f"{r['err']:.1e}", order, agree,
                     f"{max(pi.residual, si.residual):.0e}", note])
    print(format_table(
        ["case", "method", "steps", "sequential (s)", "seq err", f"{args.solver} (s)",
         "speedup", "iterations", "windows", f"{args.solver} err", "order", "|par - seq|",
         "residual", ""], rows))
    print(f"\nerr: max |y - scipy| over the grid (solve_ivp rtol 1e-10); order: log2 of the "
          f"error ratio with twice the substeps (- when that error is under 1e-8, the "
          f"reference's own accuracy); residual: the largest scheme residual of "
          f"either solve (tol 1e-10); ~: sequential time extrapolated from its first "
          f"{args.max_sequential} steps.")




def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nplot saved to {path}")


def _method(args, default: str = "gauss_legendre_4") -> str:
    return args.method or default


# ---------------------------------------------------------------------------- the examples

def _competition(args) -> int:
    from .examples import COMPETITION, Competition

    n = 3 if args.quick else 6
    tend = 15.0 if args.quick else 30.0
    T = _points(args, 601, 31)
    g = torch.linspace(0.05, 1.25, n, dtype=torch.float64)
    y0 = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)  # (n^2, 2)
    t = torch.linspace(0, tend, T, dtype=torch.float64)
    cases = [Case(name, Competition(**p), y0, t, _method(args)) for name, p in
             COMPETITION.items()]
    print(f"Two-species competition, {n * n} initial conditions at once (batch), t in "
          f"[0, {tend:g}], {T} points\n  x1' = r1 x1 (1 - x1/N1) - a1 x1 x2,  "
          f"x2' = r2 x2 (1 - x2/N2) - a2 x1 x2\n")
    for c in cases:
        _run_case(c, args)
    _table(cases, args)
    for c in cases:
        eq = ", ".join(f"({x1:.3g}, {x2:.3g}) {'stable' if st else 'unstable'}"
                       for x1, x2, st in c.func.equilibria())
        end = c.result["par"][-1]  # (n^2, 2)
        wins = [int((end[:, 0] > 1e-3).sum()), int((end[:, 1] > 1e-3).sum())]
        both = int(((end > 1e-3).all(-1)).sum())
        print(f"\n{c.name}: {dict(COMPETITION[c.name])}\n  equilibria: {eq}\n  at t = {tend:g}: "
              f"species 1 survives in {wins[0]}, species 2 in {wins[1]}, both in {both} of "
              f"{end.shape[0]} runs")
    if args.plot:
        plt = _pyplot()
        if plt is not None:
            fig, axes = plt.subplots(1, 2, figsize=(11, 5))
            for ax, c in zip(axes, cases, strict=True):
                _phase_competition(ax, c)
            _save(plt, fig, args.plot)
    return 0


def _phase_competition(ax, c: Case) -> None:
    f = c.func
    y = c.result["par"].numpy()  # (T, n^2, 2)
    for i in range(y.shape[1]):
        ax.plot(y[:, i, 0], y[:, i, 1], lw=1, color="tab:blue", alpha=0.7)
        ax.plot(y[0, i, 0], y[0, i, 1], "o", ms=3, color="tab:blue")
    x = np.linspace(0, 1.35, 100)
    ax.plot(f.N1 * (1 - f.a1 * x / f.r1), x, "--", color="tab:red",
            label="x1-nullcline: x1 = N1 (1 - a1 x2 / r1)")
    ax.plot(x, f.N2 * (1 - f.a2 * x / f.r2), "--", color="tab:green",
            label="x2-nullcline: x2 = N2 (1 - a2 x1 / r2)")
    for x1, x2, stable in f.equilibria():
        ax.plot(x1, x2, "o", ms=9, color="k", mfc="k" if stable else "w", zorder=5)
    ax.set(xlim=(0, 1.3), ylim=(0, 1.3), xlabel="x1", ylabel="x2",
           title=f"{c.name} (filled: stable equilibrium)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)


def _mathieu(args) -> int:
    from ..bench import format_table
    from .examples import Mathieu, mathieu_chart, scipy_reference

    nA, nQ = (16, 12) if args.quick else (90, 60)
    T = _points(args, 101, 41)
    method = _method(args)
    a = torch.linspace(-2, 10, nA, dtype=torch.float64)
    q = torch.linspace(0, 6, nQ, dtype=torch.float64)
    print(f"Mathieu x'' + (a - 2q cos 2t) x = 0: Floquet stability over a {nA} x {nQ} grid of "
          f"(a, q), the monodromy matrix over one period [0, pi] from {2 * nA * nQ} systems "
          f"solved at once (batch dims (a, q, column)), {T} points, {method}\n")
    rows, charts = [], {}
    for solver in ("sequential", args.solver):
        start = time.perf_counter()
        with torch.no_grad():
            half_trace, info = mathieu_chart(a, q, points=T, method=method, solver=solver)
        el = time.perf_counter() - start
        charts[solver] = half_trace
        rows.append([solver, f"{el:.2f}", info.iterations, info.windows,
                     f"{info.residual:.0e}", f"{float((half_trace < 1).float().mean()):.3f}"])
    speed = float(rows[0][1]) / float(rows[1][1])
    print(format_table(["solver", "time (s)", "iterations", "windows", "residual",
                        "stable fraction"], rows))
    print(f"speedup of {args.solver} over sequential: {speed:.2f}x; max difference of |tr|/2 "
          f"between them: {(charts['sequential'] - charts[args.solver]).abs().max().item():.1e}"
          f"\n(a linear ODE: Newton over the grid converges in one iteration; on a CPU the "
          f"batch of {2 * nA * nQ} systems already fills the cores, so the loop is not slower "
          f"per step, see paraseq.ode.choose_solver)")
    # spot checks against scipy
    g = torch.Generator().manual_seed(args.seed)
    ia = torch.randint(0, nA, (5,), generator=g)
    iq = torch.randint(0, nQ, (5,), generator=g)
    t = torch.linspace(0, math.pi, T, dtype=torch.float64)
    worst = 0.0
    spot = []
    for i, j in zip(ia.tolist(), iq.tolist(), strict=True):
        fld = Mathieu(a[i], q[j])
        ref = scipy_reference(fld, torch.eye(2, dtype=torch.float64), t)  # (T, 2, 2)
        tr = abs(ref[-1, 0, 0] + ref[-1, 1, 1]) / 2
        got = float(charts[args.solver][i, j])
        worst = max(worst, abs(got - tr))
        spot.append([f"{float(a[i]):.2f}", f"{float(q[j]):.2f}", f"{got:.8f}", f"{tr:.8f}",
                     "stable" if tr < 1 else "unstable"])
    print("\nspot checks against scipy (DOP853, rtol 1e-10):")
    print(format_table(["a", "q", "|tr|/2 paraseq", "|tr|/2 scipy", ""], spot))
    print(f"max |difference| {worst:.1e}")
    if args.plot:
        plt = _pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(7, 5.5))
            ht = charts[args.solver].numpy()
            im = ax.pcolormesh(q.numpy(), a.numpy(), np.log10(np.maximum(ht, 1e-3)),
                               cmap="RdBu_r", vmin=-1, vmax=1, shading="auto")
            ax.contour(q.numpy(), a.numpy(), ht, levels=[1.0], colors="k", linewidths=1)
            fig.colorbar(im, ax=ax, label="log10 |tr M| / 2  (> 0: unstable)")
            ax.set(xlabel="q", ylabel="a", title="Mathieu stability chart (blue: stable)")
            _save(plt, fig, args.plot)
    return 0


def _pendulum(args) -> int:
    from .examples import Pendulum

    T = _points(args, 4001, 401)
    tend = 0.5 if args.quick else 2.0
    w = torch.tensor([200.0, 50.0], dtype=torch.float64)
    fld = Pendulum(w)
    y0 = torch.tensor([[0.2, 0.0], [0.2, 0.0]], dtype=torch.float64)  # (2, 2)
    t = torch.linspace(0, tend, T, dtype=torch.float64)
    case = Case("pendulum", fld, y0, t, _method(args))
    print(f"Inverted pendulum on a vibrating pivot, l theta'' + (h0 w^2 cos(w t) - g) sin theta "
          f"= 0, l = {fld.l}, h0 = {fld.h0}, g = {fld.g}; theta(0) = 0.2 from the upright;\n"
          f"w = 200 (fast) and 50 (slow) at once (batch); Kapitza: upright is stable for "
          f"w > sqrt(2 g l) / h0 = {fld.kapitza_w():.0f}; t in [0, {tend}], {T} points\n")
    _run_case(case, args)
    _table([case], args)
    th = case.result["par"][..., 0]  # (T, 2)
    for i, name in enumerate(("fast", "slow")):
        late = th[T // 2:, i].abs().max().item()
        verdict = "stays up" if late < 0.5 else "falls"
        print(f"\n{name} pivot (w = {float(w[i]):.0f}): max |theta| over the second half "
              f"{late:.2f} rad: {verdict}")
    if args.plot:
        plt = _pyplot()
        if plt is not None:
            y = case.result["par"].numpy()
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
            for i, name in enumerate(("w = 200 (fast)", "w = 50 (slow)")):
                ax1.plot(t.numpy(), y[:, i, 0], lw=1, label=name)
                ax2.plot(y[:, i, 0], y[:, i, 1], lw=0.6, label=name)
            ax1.set(xlabel="t", ylabel="theta (from the upright)", title="theta(t)")
            ax2.set(xlabel="theta", ylabel="theta'", title="phase portrait")
            for ax in (ax1, ax2):
                ax.legend()
                ax.grid(alpha=0.3)
            _save(plt, fig, args.plot)
    return 0


def _vanderpol(args) -> int:
    from .examples import VanDerPol

    if args.quick:  # (mu, t_end, substeps, points per unit time)
        setups = [(1.0, 6.0, 1, 25), (10.0, 6.0, 1, 25), (100.0, 6.0, 8, 5)]
    else:
        setups = [(1.0, 20.0, 1, 100), (10.0, 40.0, 1, 100), (100.0, 200.0, 16, 10)]
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    cases = []
    for mu, tend, k, per_unit in setups:
        T = _points(args, int(per_unit * tend) + 1, int(per_unit * tend) + 1)
        t = torch.linspace(0, tend, T, dtype=torch.float64)
        cases.append(Case(f"mu = {mu:g}", VanDerPol(mu), y0, t, _method(args), substeps=k,
                          reference="Radau"))
    print("Van der Pol x'' - mu (1 - x^2) x' + x = 0, x(0) = 2, x'(0) = 0: stiff for large "
          "mu (mu = 100 with substeps: its fast jumps need h < 1/(mu |1 - x^2|))\n")
    for c in cases:
        _run_case(c, args)
    _table(cases, args)
    rows = []
    for c in cases:
        r = c.result
        e1 = abs(float(r["par"][-1, 0]) - r["ref"][-1, 0])
        e2 = abs(float(r["fine"][-1, 0]) - r["ref"][-1, 0])
        order = f"{math.log2(e1 / e2):.2f}" if e2 > 1e-8 else "-"
        rows.append([c.name, f"{float(c.t[-1]):g}", f"{e1:.1e}", f"{e2:.1e}", order])
    from ..bench import format_table

    print("\nThe error of x at the end (in a slow phase). Over the whole grid the largest error "
          "sits at the fast jumps,\nwhere a time shift of the jump far smaller than a step "
          "makes a large difference at a grid point:")
    print(format_table(["case", "t_end", "|x - scipy|", "with 2x substeps", "order"], rows))
    if args.plot:
        plt = _pyplot()
        if plt is not None:
            fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
            for ax, c in zip(axes, cases, strict=True):
                y = c.result["par"].numpy()
                ax.plot(c.result["ref"][:, 0], c.result["ref"][:, 1], lw=3, alpha=0.3,
                        color="k", label="scipy Radau")
                ax.plot(y[:, 0], y[:, 1], ".-", ms=2, lw=0.7, label=f"odeint {c.method}")
                ax.set(xlabel="x", ylabel="x'", title=f"Van der Pol, {c.name}")
                ax.legend(fontsize=8)
                ax.grid(alpha=0.3)
            _save(plt, fig, args.plot)
    return 0


def _lorenz(args) -> int:
    from ..bench import format_table
    from .examples import Lorenz

    tend = 2.0 if args.quick else 20.0
    T = _points(args, int(100 * tend) + 1, int(100 * tend) + 1)
    t = torch.linspace(0, tend, T, dtype=torch.float64)
    case = Case("lorenz", Lorenz(), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), t,
                _method(args), order_check=False)
    print(f"Lorenz (sigma 10, rho 28, beta 8/3) from (1, 1, 1), t in [0, {tend}], {T} points: "
          f"chaos, the honest failure mode\n")
    _run_case(case, args)
    _table([case], args)
    r = case.result
    pi = r["par_info"]
    print(f"\nWhat the parallel solver did: Newton over the whole grid converged on the first "
          f"{pi.fallback_from if pi.fell_back else T - 1} steps only (the linearised dynamics "
          f"amplify errors like exp(0.9 t)); the fallback then solved {pi.windows} windows "
          f"in parallel, each as long as Newton reaches (doubled after every success, cut to "
          f"the converged prefix after a failure), {pi.iterations} iterations in all, "
          f"{pi.sequential_steps} steps stepped one by one.\nEvery step satisfies the scheme: "
          f"largest scheme residual {pi.residual:.1e} (tol {pi.tol:.0e}).")
    rows = []
    for tc in [1.0, 2.0, 5.0, 10.0, 15.0, 20.0]:
        if tc > tend:
            continue
        i = round(tc / tend * (T - 1))
        e_par = float(np.abs(r["par"][i].numpy() - r["ref"][i]).max())
        e_seq = "-" if r["seq"] is None else \
            f"{float(np.abs(r['seq'][i].numpy() - r['ref'][i]).max()):.1e}"
        d = "-" if r["seq"] is None else f"{(r['par'][i] - r['seq'][i]).abs().max().item():.1e}"
        rows.append([f"{tc:g}", f"{e_par:.1e}", e_seq, d])
    print("\nDivergence in time (chaos amplifies any difference, the scheme's own error "
          "included):")
    print(format_table(["t", "|parallel - scipy|", "|sequential - scipy|",
                        "|parallel - sequential|"], rows))
    print("Parallel and sequential solve the same discrete equations to 1e-10 per step; "
          "their trajectories part like exp(0.9 t), as both part from scipy's.")
    if args.plot:
        plt = _pyplot()
        if plt is not None:
            y = r["par"].numpy()
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
            ax1.plot(r["ref"][:, 0], r["ref"][:, 2], lw=2.5, alpha=0.3, color="k",
                     label="scipy DOP853")
            ax1.plot(y[:, 0], y[:, 2], lw=0.7, label=f"odeint {case.method}, {args.solver}")
            ax1.set(xlabel="x", ylabel="z", title="Lorenz attractor (x, z)")
            err = np.abs(y - r["ref"]).max(-1)
            ax2.semilogy(t.numpy(), np.maximum(err, 1e-16), label="|parallel - scipy|")
            if r["seq"] is not None:
                d = (r["par"] - r["seq"]).abs().amax(-1).numpy()
                ax2.semilogy(t.numpy(), np.maximum(d, 1e-16), label="|parallel - sequential|")
            res = pi.step_residuals.numpy()
            ax2.semilogy(t.numpy()[1:], np.maximum(res, 1e-18), lw=0.5,
                         label="scheme residual per step")
            ax2.axhline(pi.tol, color="k", ls="--", lw=0.8, label="tol")
            ax2.set(xlabel="t", title="errors: chaos amplifies, every step stays exact")
            for ax in (ax1, ax2):
                ax.legend(fontsize=8)
                ax.grid(alpha=0.3)
            _save(plt, fig, args.plot)
    return 0
