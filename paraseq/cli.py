"""The command line: ``python -m paraseq demo`` (the main job) and friends."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

from ._version import __version__

_BAR = None  # the open tqdm bar of _progress, if any


def _plain_progress() -> bool:
    """Plain lines instead of a bar: stderr is not a terminal (a log, a pipe) or CI=true."""
    return os.environ.get("CI", "").lower() == "true" or not sys.stderr.isatty()


def _progress(i: int, n: int, label: str) -> None:
    """Step i of n is ``label`` (i = n: done), on stderr: a tqdm bar on a terminal, one plain
    line per step in a log or under CI=true (a bar's carriage returns garble both)."""
    global _BAR
    if _plain_progress():
        print(f"[{i}/{n}] {label}", file=sys.stderr, flush=True)
        return
    if _BAR is None or i == 0 or _BAR.total != n or i < _BAR.n:
        if _BAR is not None:
            _BAR.close()
        from tqdm import tqdm

        _BAR = tqdm(total=n, file=sys.stderr, leave=True, dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
    _BAR.set_description_str(label, refresh=False)
    _BAR.update(i - _BAR.n)
    if i >= n:
        _BAR.close()
        _BAR = None


def _scan_demo(args: argparse.Namespace, out_dir: Path) -> Path | None:
    from .bench import format_table, time_call
    from .scan import BACKENDS, linear_scan
    from .scan.api import choose_backend

    torch.manual_seed(args.seed)
    T, B, D = args.length, 4, 16
    # long memory: |a| close to 1, so errors have T steps to accumulate
    a = 0.9 + 0.1 * torch.rand(B, T, D)  # (B, T, D)
    b = torch.randn(B, T, D)  # (B, T, D)
    x0 = torch.randn(B, D)  # (B, D)
    auto = choose_backend(T, D, B, False, a.dtype, a.device)
    print(f"linear_scan: x_t = a_t * x_(t-1) + b_t, diagonal, float32, batch {B}, D {D}, "
          f"T {T:,} (auto picks {auto!r})\n")
    # every backend that runs here (triton's CPU interpreter is for tests, not for timing)
    names = [name for name, b in BACKENDS.items() if b.is_available(a.device)
             and not (name == "triton" and a.device.type == "cpu")] + ["auto"]
    steps = len(names) + 1
    _progress(0, steps, "float64 reference")
    ref = linear_scan(a.double(), b.double(), x0.double(), backend="sequential")
    results = {}
    for i, name in enumerate(names, start=1):
        _progress(i, steps, name)
        reps = 1 if name == "sequential" else 5
        timing = time_call(lambda n=name: linear_scan(a, b, x0, backend=n), repeats=reps,
                           warmup=0 if name == "sequential" else 1)
        x = linear_scan(a, b, x0, backend=name)
        err_t = (x.double() - ref).abs().amax(dim=(0, 2))  # (T,)
        results[name] = (timing.median, err_t)
    _progress(steps, steps, "done")
    t_seq = results["sequential"][0]
    rows = [[n, f"{results[n][0] * 1e3:.1f}", f"{t_seq / results[n][0]:.1f}x",
             f"{results[n][1].max().item():.2e}",
             f"{12 * B * T * D / results[n][0] / 1e9:.2f}"] for n in names]
    print(format_table(["backend", "time (ms)", "speedup", "max |x - x_f64|", "GB/s"], rows))

    # how each backend scales with T (shorter runs, the same coefficients)
    lengths = [T // 1000, T // 100, T // 10, T]
    lengths = [n for n in lengths if n >= 10]
    scaling: dict[str, list[float]] = {n: [] for n in names}
    for n_t in lengths:
        for name in names:
            if n_t == T:
                scaling[name].append(results[name][0])
                continue
            reps = 1 if name == "sequential" else 3
            tm = time_call(lambda n=name, k=n_t: linear_scan(a[:, :k], b[:, :k], x0, backend=n),
                           repeats=reps)
            scaling[name].append(tm.median)
    if args.no_plot:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        ax1.loglog(lengths, scaling[name], "o-", label=name)
        err = results[name][1].clamp_min(1e-12)  # (T,)
        block = max(1, T // 400)  # the worst error in each of ~400 windows, readable at a glance
        n_full = T // block * block
        worst = err[:n_full].reshape(-1, block).amax(-1)
        ax2.semilogy(torch.arange(worst.numel()) * block + block, worst.numpy(), lw=1.0,
                     label=name, alpha=0.8)
    ax1.set(xlabel="sequence length T", ylabel="seconds",
            title=f"linear_scan time (float32, batch {B}, D {D})")
    ax2.set(xlabel="time step t", ylabel=f"max |x - x_float64 loop| per {block} steps",
            title="float32 error along the sequence")
    return _save(plt, fig, (ax1, ax2), out_dir / "demo_linear_scan.png")


def _solve_demo(args: argparse.Namespace, out_dir: Path) -> Path | None:
    from .bench import format_table, time_call
    from .nn import GRU
    from .solve import METHODS, solve_recurrence

    torch.manual_seed(args.seed)
    B, D, T = args.gru_batch, 8, args.gru_length
    cell = torch.nn.GRUCell(D, D)
    x = torch.randn(B, T, D)  # (B, T, n)
    # what a user would otherwise run, with the cell's weights: torch's fused kernel, and
    # paraseq's own drop-in module (method "auto": on a CPU its compiled loop)
    baselines = {"torch.nn.GRU": torch.nn.GRU(D, D, batch_first=True),
                 "paraseq.nn.GRU": GRU(D, D, batch_first=True)}
    for m in baselines.values():
        for ours, theirs in (("weight_ih_l0", "weight_ih"), ("weight_hh_l0", "weight_hh"),
                             ("bias_ih_l0", "bias_ih"), ("bias_hh_l0", "bias_hh")):
            getattr(m, ours).data.copy_(getattr(cell, theirs).data)
    print(f"\nsolve_recurrence: torch.nn.GRUCell(8, 8), float32, batch {B}, T {T:,}: each "
          f"method against the Python loop over the cell, torch.nn.GRU (torch's fused kernel) "
          f"and paraseq.nn.GRU (paraseq's compiled loop), same weights\n")
    names = [*METHODS]
    steps = len(names) + len(baselines)
    results = {}
    base_times = {}
    with torch.no_grad():
        for i, (label, m) in enumerate(baselines.items()):
            _progress(i, steps, label)
            base_times[label] = time_call(lambda m=m: m(x), repeats=3, warmup=1).median
        for i, name in enumerate(names, start=len(baselines)):
            _progress(i, steps, name)
            reps = 1 if name == "sequential" else 3
            timing = time_call(lambda n=name: solve_recurrence(cell, x, method=n),
                               repeats=reps, warmup=0 if name == "sequential" else 1)
            h, info = solve_recurrence(cell, x, method=name, return_info=True)
            results[name] = (timing.median, h, info)
        _progress(steps, steps, "done")
        nn_path = baselines["paraseq.nn.GRU"].last_path
    ref = results["sequential"][1]
    t_seq = results["sequential"][0]
    t_torch, t_ours = base_times["torch.nn.GRU"], base_times["paraseq.nn.GRU"]
    rows = [["torch.nn.GRU", "", "", "", f"{t_torch * 1e3:.1f}", f"{t_seq / t_torch:.2f}x",
             "1.00x", f"{t_ours / t_torch:.2f}x", ""],
            [f"paraseq.nn.GRU ({nn_path})", "", "", "", f"{t_ours * 1e3:.1f}",
             f"{t_seq / t_ours:.2f}x", f"{t_torch / t_ours:.2f}x", "1.00x", ""]]
    for name in names:
        t, h, info = results[name]
        note = f"fell back at t={info.fallback_from}" if info.fell_back else ""
        rows.append([name, info.iterations, f"{(h - ref).abs().max().item():.1e}",
                     f"{info.residual:.1e}", f"{t * 1e3:.1f}", f"{t_seq / t:.2f}x",
                     f"{t_torch / t:.2f}x", f"{t_ours / t:.2f}x", note])
    print(format_table(["method", "iterations", "max |h - loop|", "residual", "time (ms)",
                        "x loop", "x torch.nn.GRU", "x compiled loop", ""], rows))
    with torch.no_grad():
        auto = solve_recurrence(cell, x, method="auto", return_info=True)[1]
    print(f"\nauto ran {auto.method!r} on this generic cell (paraseq.solve.choose_method: "
          + (f"T = {T:,} <= 64 or B D^2 = {B * D * D} over the CPU bound for its Jacobian: "
             f"the loop is cheaper" if auto.method == "sequential" else
             f"T = {T:,} > 64, and on a CPU the parallel path pays while B D^2 = {B * D * D} "
             f"stays under the bound for its Jacobian, {auto.jacobian}") +
          f"). paraseq.nn.GRU's auto "
          f"ran its {nn_path}: on a CPU a compiled loop runs at arithmetic speed, so it is "
          f"the bar a parallel method must beat there (the parallel methods pay on wide "
          f"devices and for cells without a compiled loop).")
    if args.no_plot:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"newton": dict(ls="--", marker="s", ms=6, mfc="none", lw=2)}
    for name in names[1:]:
        res = results[name][2].residuals
        style = styles.get(name, dict(marker="o", ms=3))
        ax.semilogy(range(len(res)), [max(r, 1e-16) for r in res], label=name, **style)
    ax.axhline(results["newton"][2].tol, color="k", ls="--", lw=0.8, label="tolerance")
    ax.set(xlabel="iteration", ylabel="max scaled residual |h_t - f(x_t, h_t-1)|",
           title=f"GRU (hidden {D}), T = {T:,}: residual per iteration")
    return _save(plt, fig, (ax,), out_dir / "demo_solve_residuals.png")


def _save(plt, fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plot: matplotlib is missing; pip install 'paraseq[plots]')")
        return None
    return plt


def cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", None):  # paraseq.distributed's demo (issue 17)
        from .distributed.demo import run_demo
        return run_demo(args.distributed, args.length, args.gru_length, args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"paraseq {__version__} demo (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    for demo in (_scan_demo, _solve_demo):
        path = demo(args, out_dir)
        if path is not None:
            print(f"\nplot saved to {path}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


_COMMANDS: list[str] = [".bench.cli", ".ssm.cli", ".ode.cli", ".attention.cli", ".diagnostics.cli",
                       ".train.cli"]
"""Modules (relative to paraseq) that add subcommands: each has ``register(sub)``, which calls
``sub.add_parser(...)`` and sets ``func`` (args -> exit code) by ``set_defaults``. Imported
only when the parser is built, so ``import paraseq`` stays light."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m paraseq",
                                     description="paraseq: sequential models, parallel in time.")
    parser.add_argument("--version", action="version", version=f"paraseq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: every path against the sequential loop")
    demo.add_argument("--out", default="paraseq-out",
                      help="folder for plots (default: %(default)s)")
    demo.add_argument("--length", type=int, default=100_000,
                      help="sequence length T (default: %(default)s)")
    demo.add_argument("--gru-length", type=int, default=50_000,
                      help="sequence length of the GRU part (default: %(default)s)")
    demo.add_argument("--gru-batch", type=int, default=1,
                      help="batch size of the GRU part (default: %(default)s; on a CPU the "
                           "parallel methods pay while batch * hidden^2 stays small)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-plot", action="store_true", help="print the tables only")
    demo.add_argument("--distributed", type=int, metavar="N", default=0,
                      help="spawn N gloo processes and split time across them")
    demo.set_defaults(func=cmd_demo)
    for module in _COMMANDS:
        importlib.import_module(module, __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("length", "gru_length", "gru_batch"):
        if getattr(args, flag, 1) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    return int(args.func(args))
