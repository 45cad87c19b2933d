"""``python -m paraseq bench``: paraseq.nn.GRU against torch.nn.GRU over a grid of workloads.

Each workload is a one-layer GRU with input size = hidden size H, batch B, length T, float32,
batch_first, run forward (under no_grad) or forward+backward (loss = sum of the outputs,
gradients to the input and every weight). For each one the bench times, in the same run:

- torch.nn.GRU (what users would otherwise run; the speedups are its time over ours),
- paraseq.nn.GRU with method="auto" (the path paraseq picks: the speedup users get; on a CPU
  often the compiled loop of ``paraseq.cells.compiled``),
- paraseq.nn.GRU with method="newton" forced (the parallel path, whatever auto would do),

and records the path auto chose, its Newton iterations, and the largest error of its output
against torch.nn.GRU's. With ``peers`` (``paraseq.bench.peers``), the same row also times
the installed peers on the same workload: a jitted JAX lax.scan GRU with the same weights,
DEER in JAX, and pararnn-torch's diagonal ParaGRU against paraseq.nn.DiagGRU; they are
printed as a second table (``peer_table``) and written to the same CSV rows.

Timings are medians of up to ``repeats`` runs after a warm-up, each measurement capped by a
time budget (a slow configuration is run fewer times, never skipped silently: a configuration
estimated above ``skip_after`` seconds is marked "skip").
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .peers import NOTES as PEER_NOTES
from .peers import PEER_HEADERS, PeerInfo, PeerTimes, peer_rows
from .timing import format_table, time_call


@dataclass
class Workload:
    hidden: int
    batch: int
    T: int
    backward: bool

    @property
    def pass_(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"


@dataclass
class Result:
    hidden: int
    batch: int
    T: int
    pass_: str
    torch_s: float | None
    auto_s: float | None
    newton_s: float | None
    auto_path: str
    auto_iterations: int | None
    newton_iterations: int | None
    max_err: float
    peers: PeerTimes | None = None

    @property
    def speedup(self) -> float | None:
        if self.torch_s is None or self.auto_s is None:
            return None
        return self.torch_s / self.auto_s

    @property
    def newton_speedup(self) -> float | None:
        if self.torch_s is None or self.newton_s is None:
            return None
        return self.torch_s / self.newton_s


FULL_GRID = dict(hidden=(1, 8, 32, 64), T=(1_000, 10_000, 100_000), batch=(1, 16))
QUICK_GRID = dict(hidden=(1, 8), T=(1_000,), batch=(1, 16))


def workloads(grid: dict, passes: Iterable[bool]) -> list[Workload]:
    return [Workload(H, B, T, bwd) for bwd in passes for H in grid["hidden"]
            for B in grid["batch"] for T in grid["T"]]


def _runner(module: torch.nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], object]:
    def run():
        if backward:
            out = module(x)[0]
            out.sum().backward()
            return out
        with torch.no_grad():
            return module(x)[0]
    return run


def measure(w: Workload, *, repeats: int, budget: float, history: dict,
            skip_after: float, peers: dict[str, PeerInfo] | None = None) -> Result:
    """Times one workload. ``history`` maps (path, H, B, pass) to (T, seconds) of the last
    shorter run, to estimate this one's cost linearly in T and skip it above ``skip_after``.
    ``peers``: ``paraseq.bench.peers.detect()``'s answer, to time those peers too (None: no
    peer columns)."""
    from ..nn import GRU

    torch.manual_seed(w.hidden * 7919 + w.batch * 31 + w.T)
    ref = torch.nn.GRU(w.hidden, w.hidden, batch_first=True)
    auto = GRU(w.hidden, w.hidden, batch_first=True, method="auto")
    newton = GRU(w.hidden, w.hidden, batch_first=True, method="newton")
    auto.load_state_dict(ref.state_dict())
    newton.load_state_dict(ref.state_dict())
    x = torch.randn(w.batch, w.T, w.hidden, requires_grad=w.backward)  # (B, T, H)
    times: dict[str, float | None] = {}
    for name, module in (("torch", ref), ("auto", auto), ("newton", newton)):
        key = (name, w.hidden, w.batch, w.pass_)
        prev = history.get(key)
        est = prev[1] * w.T / prev[0] if prev else 0.0
        if est > skip_after:
            times[name] = None
            continue
        t = time_call(_runner(module, x, w.backward), repeats=repeats,
                      warmup=1 if est < budget else 0, budget=budget).median
        history[key] = (w.T, t)
        times[name] = t
    with torch.no_grad():
        want = ref(x)[0]
    with torch.set_grad_enabled(w.backward):  # auto's choice depends on the grad mode
        got = auto(x)[0]
    infos = auto.last_solve_info
    path = auto.last_path
    newton_iters = None
    if times["newton"] is not None:
        with torch.no_grad():
            newton(x)
        newton_iters = newton.last_solve_info[0].iterations
    peer_times = None
    if peers is not None:
        from . import peers as peers_mod

        peer_times = peers_mod.measure(w, ref, x, want, peers, repeats=repeats, budget=budget,
                                       history=history, skip_after=skip_after)
    return Result(w.hidden, w.batch, w.T, w.pass_, times["torch"], times["auto"],
                  times["newton"], path, infos[0].iterations if infos else None, newton_iters,
                  (got.detach() - want).abs().max().item(), peer_times)


def _ms(t: float | None) -> str:
    return "skip" if t is None else f"{t * 1e3:.1f}"


def _x(s: float | None) -> str:
    return "" if s is None else f"{s:.2f}x"


HEADERS = ["pass", "hidden", "batch", "T", "torch.nn.GRU ms", "auto ms", "speedup",
           "auto path", "iters", "max err", "newton ms", "newton speedup"]


def rows(results: list[Result]) -> list[list[str]]:
    return [[r.pass_, str(r.hidden), str(r.batch), f"{r.T:.0e}", _ms(r.torch_s), _ms(r.auto_s),
             _x(r.speedup), r.auto_path, "" if r.auto_iterations is None
             else str(r.auto_iterations), f"{r.max_err:.1e}", _ms(r.newton_s),
             _x(r.newton_speedup)] for r in results]


def table(results: list[Result], markdown: bool = False) -> str:
    return format_table(HEADERS, rows(results), markdown)


def peer_table(results: list[Result], markdown: bool = False) -> str:
    """The peers' columns of the rows that timed peers (empty when none did), with notes."""
    sel = [r for r in results if r.peers is not None]
    if not sel:
        return ""
    return format_table(PEER_HEADERS, peer_rows(sel), markdown) + "\n" + PEER_NOTES


def peer_summary(results: list[Result]) -> list[str]:
    """The issue's two JAX targets, per pass: the worst auto/jax at hidden <= 32 (target
    <= 1.5x) and the worst DEER/newton (target >= 2x), over the rows that have both times."""
    out = []
    for pass_ in sorted({r.pass_ for r in results}):
        sel = [r for r in results if r.pass_ == pass_ and r.peers is not None]
        aj = [r.auto_s / r.peers.jax_s for r in sel
              if r.hidden <= 32 and r.auto_s and r.peers.jax_s]
        dn = [r.peers.deer_s / r.newton_s for r in sel if r.newton_s and r.peers.deer_s]
        if aj:
            out.append(f"{pass_}: auto/jax at hidden <= 32: worst {max(aj):.2f}x, geometric "
                       f"mean {geometric_mean(aj):.2f}x (target <= 1.5x)")
        if dn:
            out.append(f"{pass_}: DEER/newton: worst {min(dn):.2f}x, geometric mean "
                       f"{geometric_mean(dn):.2f}x (target >= 2x)")
    return out


def write_csv(results: list[Result], path: Path) -> None:
    """One row per workload; with peers, their columns (``PeerTimes``' fields) too."""
    peer_fields = list(asdict(PeerTimes()))
    with_peers = any(r.peers is not None for r in results)
    with path.open("w", newline="") as fh:
        base = [k for k in asdict(results[0]) if k != "peers"]
        fields = [*base, "speedup", "newton_speedup", *(peer_fields if with_peers else [])]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in results:
            row = {k: v for k, v in asdict(r).items() if k in base}
            row.update(speedup=r.speedup, newton_speedup=r.newton_speedup)
            if with_peers:
                p = asdict(r.peers) if r.peers is not None else {}
                row.update({k: p.get(k) for k in peer_fields})
            w.writerow(row)


def plot(results: list[Result], path: Path) -> Path | None:
    """Speedup over torch.nn.GRU against T, one line per hidden size; one panel per pass and
    batch (the DEER paper's figure, with auto's speedup solid and forced Newton dashed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is missing; pip install 'paraseq[plots]')", file=sys.stderr)
        return None
    panels = sorted({(r.pass_, r.batch) for r in results}, key=lambda p: (p[0] != "fwd", p[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (pass_, batch) in zip(axes[0], panels, strict=True):
        sel = [r for r in results if r.pass_ == pass_ and r.batch == batch]
        for i, H in enumerate(sorted({r.hidden for r in sel})):
            line = sorted((r for r in sel if r.hidden == H), key=lambda r: r.T)
            color = f"C{i}"
            ts = [r.T for r in line if r.speedup is not None]
            ax.plot(ts, [r.speedup for r in line if r.speedup is not None], "o-", color=color,
                    label=f"hidden {H}")
            tn = [r.T for r in line if r.newton_speedup is not None]
            ax.plot(tn, [r.newton_speedup for r in line if r.newton_speedup is not None], "x--",
                    color=color, alpha=0.6)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("speedup over torch.nn.GRU")
        ax.set_title(f"{pass_}, batch {batch}\n(solid: auto, dashed: newton)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def geometric_mean(values: Iterable[float]) -> float:
    vals = [math.log(v) for v in values if v is not None and v > 0]
    return math.exp(sum(vals) / len(vals)) if vals else float("nan")
