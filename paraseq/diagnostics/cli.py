"""``python -m paraseq diagnose``: Elman and GRU cells whose recurrent weight's scale sweeps
through the edge of chaos; for each, the largest Lyapunov exponent and the iterations
Newton, quasi-Newton and damped Newton need at T in {1e2, 1e3, 1e4} (``--full``: and 1e5):
Gonzalez et al.'s figure (NeurIPS 2025), iterations against the exponent, reproduced here."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

KINDS = ("elman", "gru")
DEFAULT_GAINS = {"elman": (0.5, 1.0, 1.5, 2.0, 3.0, 4.0), "gru": (1.0, 2.0, 3.0, 4.0, 6.0, 8.0)}
METHODS = ("newton", "quasi_newton", "damped_newton")


def make_cell(kind: str, gain: float, hidden: int, inputs: int, seed: int):
    """paraseq's ElmanCell / GRUCell with W_hh's entries gain * N(0, 1 / hidden) (every gate's
    block for the GRU), the rest torch's default initialisation, from ``seed``."""
    from ..cells import ElmanCell, GRUCell

    torch.manual_seed(seed)
    cell = (ElmanCell if kind == "elman" else GRUCell)(inputs, hidden)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cell.weight_hh.copy_(torch.randn(cell.weight_hh.shape, generator=g) * gain
                             / math.sqrt(hidden))
    return cell


def run(kinds, gains: dict, lengths: list[int], methods, hidden: int, max_iter: int,
        seed: int, progress=None) -> list[dict]:
    """One record per (kind, gain): the exponent and K*(T) per method and length."""
    from . import iterations, lyapunov

    T = max(lengths)
    x = 0.1 * torch.randn(1, T, 2, generator=torch.Generator().manual_seed(seed + 1))
    records = []
    jobs = [(k, g) for k in kinds for g in gains[k]]
    for i, (kind, gain) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), f"{kind} gain {gain}")
        cell = make_cell(kind, gain, hidden, 2, seed)
        t0 = time.perf_counter()
        lle = lyapunov(cell, x[:, :min(T, 2000)], starts=2).exponent.item()
        table = iterations(cell, x, methods=methods, lengths=lengths, max_iter=max_iter)
        records.append({"kind": kind, "gain": gain, "lle": lle, "counts": table.counts,
                        "seconds": time.perf_counter() - t0})
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return records


def plot(records: list[dict], lengths: list[int], methods, max_iter: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in records}, key=KINDS.index)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 4.0), sharey=True,
                             squeeze=False)
    markers = {"elman": "o", "gru": "s"}
    for ax, m in zip(axes[0], methods, strict=True):
        for j, L in enumerate(lengths):
            color = plt.cm.viridis(j / max(1, len(lengths) - 1))
            for kind in kinds:
                rs = sorted((r for r in records if r["kind"] == kind), key=lambda r: r["lle"])
                pts = [(r["lle"], r["counts"][m][j] if r["counts"][m][j] is not None
                        else max_iter) for r in rs]
                ax.plot(*zip(*pts, strict=True), marker=markers[kind], color=color, ms=4,
                        lw=1, label=f"{kind}, T = {L:.0e}")
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.axhline(max_iter, color="r", lw=0.8, ls=":")
        ax.set(xlabel="largest Lyapunov exponent", yscale="log", title=m)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"iterations to tol (cap {max_iter}, dotted)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("parallel iterations against predictability (chaos to the right of 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..bench import format_table
    from ..cli import _progress

    lengths = [100, 1_000, 10_000] + ([100_000] if args.full else [])
    if args.lengths:
        lengths = sorted(set(args.lengths))
    if lengths[0] < 1:
        print("error: --lengths must be >= 1", file=sys.stderr)
        return 2
    kinds = KINDS if args.cell == "both" else (args.cell,)
    gains = {k: tuple(args.gains) if args.gains else DEFAULT_GAINS[k] for k in kinds}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"diagnose: {', '.join(kinds)} cells, hidden {args.hidden}, float32, batch 1, "
          f"T in {lengths}, iterations capped at {args.max_iter}\n")
    records = run(kinds, gains, lengths, args.methods, args.hidden, args.max_iter, args.seed,
                  progress=_progress)
    headers = ["cell", "gain", "LLE"] + [f"{m} T={L:.0e}" for m in args.methods
                                         for L in lengths]
    rows = [[r["kind"], f"{r['gain']:g}", f"{r['lle']:+.3f}",
             *(("-" if r["counts"][m][j] is None else r["counts"][m][j])
               for m in args.methods for j in range(len(lengths)))] for r in records]
    print(format_table(headers, rows, markdown=args.markdown))
    print(f"\n'-': not within {args.max_iter} iterations. Elapsed {time.perf_counter() - t0:.0f} s")
    if not args.no_plot:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = plot(records, lengths, args.methods, args.max_iter, out / "diagnose.png")
        print(f"plot saved to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="the exponent against parallel iterations, across the "
                                        "edge of chaos (Elman and GRU cells)")
    p.add_argument("--cell", choices=[*KINDS, "both"], default="both")
    p.add_argument("--gains", type=float, nargs="+",
                   help="recurrent weight scales (default per cell: elman "
                        f"{DEFAULT_GAINS['elman']}, gru {DEFAULT_GAINS['gru']})")
    p.add_argument("--full", action="store_true", help="also T = 1e5 (several minutes)")
    p.add_argument("--lengths", type=int, nargs="+", help="replace the lengths T")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--max-iter", type=int, default=50,
                   help="iterations before a length counts as not reached (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="paraseq-out", help="folder for the plot")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_diagnose)
