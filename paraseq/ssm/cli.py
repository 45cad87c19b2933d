"""Command-line demos: ``python -m paraseq hippo`` and ``python -m paraseq s4``.

Shape letters: B batch, L sequence length, H channels, N state size, T samples, S points.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ..cli import _pyplot


def register(sub) -> None:
    """Add the ``hippo`` and ``s4`` subcommands to the paraseq command line."""
    h = sub.add_parser("hippo", help="HiPPO online function approximation: reconstruct a signal "
                                     "from the LegS and LegT states")
    h.add_argument("--out", default="paraseq-out", help="folder for plots (default: %(default)s)")
    h.add_argument("--N", type=int, default=32, help="state size (default: %(default)s)")
    h.add_argument("--samples", type=int, default=4000,
                   help="samples of the signal, T (default: %(default)s)")
    h.add_argument("--window", type=int, default=800,
                   help="LegT window in samples (default: %(default)s)")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--no-plot", action="store_true", help="print the table only")
    h.set_defaults(func=cmd_hippo)

    s = sub.add_parser("s4", help="train S4 on a long-range memory task (L = 1000) against a GRU")
    s.add_argument("--out", default="paraseq-out", help="folder for plots (default: %(default)s)")
    s.add_argument("--length", type=int, default=1000,
                   help="sequence length L (default: %(default)s)")
    s.add_argument("--steps", type=int, default=400,
                   help="most training steps per model (default: %(default)s)")
    s.add_argument("--batch", type=int, default=32, help="batch size (default: %(default)s)")
    s.add_argument("--layer", choices=("s4", "s4d"), default="s4",
                   help="S4 (DPLR, bilinear) or S4D (diagonal, ZOH) (default: %(default)s)")
    s.add_argument("--d-model", type=int, default=16, help="channels H (default: %(default)s)")
    s.add_argument("--d-state", type=int, default=32, help="state size N (default: %(default)s)")
    s.add_argument("--gru-hidden", type=int, default=32,
                   help="GRU hidden size (default: %(default)s)")
    s.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: "
                                                           "%(default)s)")
    s.add_argument("--eval-every", type=int, default=20,
                   help="evaluate every this many steps (default: %(default)s)")
    s.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke run: L = 64, 30 steps, small models")
    s.add_argument("--no-gru", action="store_true", help="train only the S4 model")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-plot", action="store_true", help="print the curves only")
    s.set_defaults(func=cmd_s4)




def _positive(args: argparse.Namespace, *names: str) -> bool:
    for name in names:
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return False
    return True


# ------------------------------------------------------------------------------------ hippo

def _signal(seed: int, n_waves: int = 10):
    """A smooth random signal u(t), t in [0, 10]: a sum of sinusoids, returned as a function."""
    g = torch.Generator().manual_seed(seed)
    freq = 0.05 + 1.2 * torch.rand(n_waves, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n_waves, generator=g, dtype=torch.float64)
    amp = torch.randn(n_waves, generator=g, dtype=torch.float64) / math.sqrt(n_waves)

    def u(t: Tensor) -> Tensor:
        return (amp * torch.sin(2 * math.pi * freq * t[..., None] + phase)).sum(-1) * 1.5

    return u


def cmd_hippo(args: argparse.Namespace) -> int:
    from ..bench import format_table
    from .hippo import hippo_reconstruct, hippo_states

    if not _positive(args, "N", "samples", "window"):
        return 2
    if args.window > args.samples:
        print("error: --window must be <= --samples", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    T, N, W = args.samples, args.N, args.window
    span = 10.0
    h = span / T  # time between samples
    t = torch.arange(1, T + 1, dtype=torch.float64) * h  # (T,)
    u_fn = _signal(args.seed)
    u = u_fn(t)  # (T,)
    print(f"HiPPO online function approximation: N = {N}, {T} samples of a smooth signal on "
          f"[0, {span:g}]\n"
          f"  LegS: the state at time t holds the Legendre coefficients of u on [0, t] "
          f"(the whole history)\n"
          f"  LegT: the state holds them on the sliding window [t - {W * h:g}, t] ({W} samples)\n"
          f"Both states come from one paraseq.linear_scan over the samples.\n")
    states = {"legs": hippo_states(u, N, "legs"),
              "legt": hippo_states(u, N, "legt", dt=2.0 / W)}  # (T, N) each
    y = torch.linspace(0, 1, 400, dtype=torch.float64)  # (S,)
    checkpoints = [T // 4, T // 2, T]
    rows, panels = [], []
    for measure in ("legs", "legt"):
        for k in checkpoints:
            tk = k * h
            x = states[measure][k - 1]  # (N,)
            rec = hippo_reconstruct(measure, x, y)  # (S,)
            start = 0.0 if measure == "legs" else tk - W * h
            s = start + (tk - start) * y  # (S,)
            true = u_fn(s)
            err = rec - true
            rmse = err.pow(2).mean().sqrt().item()
            rows.append([measure, f"{tk:.2f}", f"[{start:.2f}, {tk:.2f}]", f"{rmse:.2e}",
                         f"{err.abs().max().item():.2e}",
                         f"{rmse / true.pow(2).mean().sqrt().item():.2e}"])
            panels.append((measure, tk, s, true, rec, rmse))
    print(format_table(["measure", "t", "window", "RMSE", "max |error|", "RMSE / RMS(u)"],
                       rows))
    print("\n(LegS spreads its N coefficients over the whole history [0, t], so detail is lost "
          "as t grows;\n LegT spends them on a window of fixed length.)")
    if not args.no_plot:
        plt = _pyplot()
        if plt is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            n_c = len(checkpoints)
            fig, axes = plt.subplots(3, n_c, figsize=(13, 8.5),
                                     gridspec_kw={"height_ratios": [1, 1, 0.8]})
            for i, (measure, tk, s, true, rec, rmse) in enumerate(panels):
                row, col = divmod(i, n_c)
                ax = axes[row, col]
                color = "C0" if measure == "legs" else "C1"
                ax.plot(t[t <= tk].numpy(), u[t <= tk].numpy(), color="0.7", lw=1.0,
                        label="signal u")
                ax.plot(s.numpy(), rec.numpy(), color=color, lw=1.3, ls="--",
                        label=f"{measure} reconstruction")
                ax.axvspan(s[0].item(), s[-1].item(), color="C2", alpha=0.07)
                ax.set(title=f"{measure.upper()}, t = {tk:.1f}: RMSE {rmse:.1e}",
                       xlim=(0, span))
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8, loc="lower left")
                err_ax = axes[2, col]
                err_ax.semilogy(s.numpy(), (rec - true).abs().clamp_min(1e-12).numpy(),
                                color=color, lw=1.0, label=f"{measure} |error|")
                err_ax.set(title=f"|reconstruction - u| at t = {tk:.1f}", xlabel="time",
                           xlim=(0, span))
                err_ax.grid(True, which="both", alpha=0.3)
                err_ax.legend(fontsize=8, loc="lower left")
            fig.suptitle(f"HiPPO: the signal against its reconstruction from the N = {N} state")
            fig.tight_layout()
            path = out / "hippo_reconstruction.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            print(f"\nplot saved to {path}")
    print(f"hippo finished in {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------------------- s4

def sign_recall_batch(n: int, L: int, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor]:
    """The task: recall the sign of the first input after L - 1 noise steps.

    Inputs (n, L, 2): channel 0 holds the sign s = +-1 at t = 0 and zeros after it; channel 1
    holds N(0, 1) noise at every step. The label (n,) is 1 for s = +1 and 0 for s = -1, and
    the model answers at the last step, L - 1 steps after the only informative input.
    """
    s = torch.randint(0, 2, (n,), generator=generator)  # (n,)
    u = torch.zeros(n, L, 2)  # (n, L, 2)
    u[:, :, 1] = torch.randn(n, L, generator=generator)
    u[:, 0, 0] = 2.0 * s - 1.0
    return u, s


class SSMClassifier(nn.Module):
    """Linear(2, H) -> S4Block (no norm) -> Linear(H, 2) on the last step.

    Further keyword arguments (dt_min, dt_max, ...) go to the S4 / S4D layer."""

    def __init__(self, H: int, N: int, L: int, layer: str, **layer_kw):
        super().__init__()
        from ..nn.s4 import S4Block

        self.encoder = nn.Linear(2, H)
        kw = {"l_max": L, **layer_kw} if layer == "s4" else layer_kw
        self.block = S4Block(H, layer=layer, d_state=N, norm=False, **kw)
        self.decoder = nn.Linear(H, 2)

    def forward(self, u: Tensor) -> Tensor:
        return self.decoder(self.block(self.encoder(u))[:, -1])  # (B, 2)


class GRUClassifier(nn.Module):
    """GRU(2, hidden) -> Linear(hidden, 2) on the last step."""

    def __init__(self, hidden: int, gru_cls):
        super().__init__()
        self.gru = gru_cls(2, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, 2)

    def forward(self, u: Tensor) -> Tensor:
        out, _ = self.gru(u)  # (B, L, hidden)
        return self.decoder(out[:, -1])


def _train(name: str, model: nn.Module, args: argparse.Namespace, test: tuple[Tensor, Tensor],
           seed: int) -> dict:
    """Adam on fresh batches; stops early once held-out accuracy is >= 99% twice running."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    u_test, y_test = test
    curve = {"step": [], "acc": [], "loss": [], "time": []}
    t0 = time.perf_counter()
    good = 0
    print(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"{'step':>6} {'loss':>8} {'held-out acc':>13} {'time (s)':>9}")
    for step in range(1, args.steps + 1):
        u, y = sign_recall_batch(args.batch, args.length, g)
        loss = nn.functional.cross_entropy(model(u), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            with torch.no_grad():
                acc = (model(u_test).argmax(-1) == y_test).float().mean().item()
            elapsed = time.perf_counter() - t0
            for key, value in zip(curve, (step, acc, loss.item(), elapsed), strict=False):
                curve[key].append(value)
            print(f"{step:>6} {loss.item():>8.4f} {acc:>13.3f} {elapsed:>9.1f}", flush=True)
            good = good + 1 if acc >= 0.99 else 0
            if good >= 2:
                print(f"{name}: reached >= 99% twice running; stopping")
                break
    curve["total_time"] = time.perf_counter() - t0
    return curve


def cmd_s4(args: argparse.Namespace) -> int:
    if args.quick:
        args.length, args.steps, args.d_model, args.d_state = 64, 30, 8, 16
        args.gru_hidden, args.eval_every = 8, 10
    if not _positive(args, "length", "steps", "batch", "d_model", "d_state", "gru_hidden",
                     "eval_every"):
        return 2
    if args.d_state % 2:
        print("error: --d-state must be even", file=sys.stderr)
        return 2
    if not (args.lr > 0):
        print("error: --lr must be > 0", file=sys.stderr)
        return 2
    try:
        from ..nn import GRU as gru_cls

        gru_name = "paraseq.nn.GRU"
    except ImportError:
        gru_cls, gru_name = nn.GRU, "torch.nn.GRU"
    t0 = time.perf_counter()
    L = args.length
    print(f"Sign recall: the sign of the first input, asked for after {L - 1} steps of noise "
          f"(L = {L}).\nBatch {args.batch}, at most {args.steps} Adam steps (lr {args.lr}) per "
          f"model, {torch.get_num_threads()} threads; chance is 50%.")
    test = sign_recall_batch(512, L, torch.Generator().manual_seed(args.seed + 12345))
    torch.manual_seed(args.seed)
    label = "S4" if args.layer == "s4" else "S4D"
    ssm = SSMClassifier(args.d_model, args.d_state, L, args.layer)
    curves = {f"{label} (H={args.d_model}, N={args.d_state})":
              _train(label, ssm, args, test, args.seed)}
    if not args.no_gru:
        torch.manual_seed(args.seed)
        gru = GRUClassifier(args.gru_hidden, gru_cls)
        curves[f"{gru_name} (hidden {args.gru_hidden})"] = _train(gru_name, gru, args, test,
                                                                  args.seed)
    print("\nmodel                                  final acc   best acc   steps   time (s)")
    for name, c in curves.items():
        print(f"{name:<38} {c['acc'][-1]:>9.3f} {max(c['acc']):>10.3f} {c['step'][-1]:>7} "
              f"{c['total_time']:>10.1f}")
    if not args.no_plot:
        plt = _pyplot()
        if plt is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
            for name, c in curves.items():
                ax1.plot(c["step"], c["acc"], "o-", ms=3, label=name)
                ax2.plot(c["time"], c["acc"], "o-", ms=3, label=name)
            for ax, xl in ((ax1, "training step"), (ax2, "seconds")):
                ax.axhline(0.5, color="k", ls=":", lw=0.8)
                ax.set(xlabel=xl, ylabel="held-out accuracy", ylim=(0.3, 1.02))
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"Sign recall after {L - 1} noise steps (batch {args.batch})")
            fig.tight_layout()
            path = out / "s4_sign_recall.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            print(f"\nplot saved to {path}")
    print(f"s4 finished in {time.perf_counter() - t0:.1f} s")
    return 0
