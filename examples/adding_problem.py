"""The adding problem (Hochreiter & Schmidhuber 1997) with paraseq.nn.GRU and torch.nn.GRU.

    python examples/adding_problem.py                       # T = 1000, the run in the README
    python examples/adding_problem.py --steps 20 --length 200 --out /tmp/adding.png

Each input step carries (value, marker): values uniform in [0, 1]; the marker is 1 at two
steps, one in each half of the sequence, and 0 elsewhere. The target is the sum of the two
marked values, read from the GRU's last output through a linear head. Predicting the mean
(1.0) scores MSE 1/6 = 0.167, the line a model must cross to show it remembers across T.

Both models start from the same weights and see the same batches in the same order, so their
loss curves must agree to float tolerance: paraseq changes how the recurrence is computed,
not what it computes. The script prints both curves' largest relative difference, the wall
time of each (the training loop only, data generation excluded), their ratio, and saves a PNG
of both curves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paraseq.nn as pnn


def adding_batch(batch: int, length: int, generator: torch.Generator,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, length, 2) and target (batch,)."""
    values = torch.rand(batch, length, generator=generator, dtype=dtype)  # (B, T)
    half = max(1, length // 2)
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, length, (batch,), generator=generator) if length > 1 else first
    marker = torch.zeros(batch, length, dtype=dtype)
    rows = torch.arange(batch)
    marker[rows, first] = 1
    marker[rows, second] = 1
    target = (values * marker).sum(1)  # (B,)
    return torch.stack([values, marker], dim=-1), target


class Model(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module, hidden: int):
        super().__init__()
        self.rnn = rnn
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(x)  # (B, T, H)
        return self.head(y[:, -1]).squeeze(-1)  # (B,)


def train(model: Model, batches, lr: float) -> tuple[list[float], float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    t0 = time.perf_counter()
    for x, target in batches:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=1000, help="sequence length T")
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--method", default="auto", help="paraseq.nn.GRU's method")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("paraseq-out/adding_problem.png"),
                   help="where the PNG goes")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    for flag in ("length", "hidden", "batch", "steps"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag} must be >= 1", file=sys.stderr)
            return 2
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    batches = [adding_batch(args.batch, args.length, g, dtype) for _ in range(args.steps)]

    torch.manual_seed(args.seed)
    reference = Model(torch.nn.GRU(2, args.hidden, batch_first=True), args.hidden).to(dtype)
    ours = Model(pnn.GRU(2, args.hidden, batch_first=True, method=args.method),
                 args.hidden).to(dtype)
    ours.load_state_dict(reference.state_dict())

    print(f"adding problem: T={args.length}, hidden={args.hidden}, batch={args.batch}, "
          f"{args.steps} Adam steps (lr {args.lr}), {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    curves, times = {}, {}
    for name, model in (("torch.nn.GRU", reference), ("paraseq.nn.GRU", ours)):
        curves[name], times[name] = train(model, batches, args.lr)
        print(f"  {name:<15} {times[name]:7.2f} s   first loss {curves[name][0]:.4f}, "
              f"last 10 mean {sum(curves[name][-10:]) / len(curves[name][-10:]):.4f}")
    info = ours.rnn.last_solve_info
    how = ours.rnn.last_path + (f", {info[0].iterations} iterations" if info else "")
    a, b = curves["paraseq.nn.GRU"], curves["torch.nn.GRU"]
    diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
    print(f"  paraseq.nn.GRU ran {how} (last step)")
    print(f"  largest relative difference between the loss curves: {diff:.2e}")
    print(f"  speedup (torch time / paraseq time): "
          f"{times['torch.nn.GRU'] / times['paraseq.nn.GRU']:.2f}x")
    if args.no_plot:
        return 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: matplotlib is missing; pip install 'paraseq[plots]')")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, args.steps + 1)
    ax.plot(steps, b, lw=3, alpha=0.5, label=f"torch.nn.GRU ({times['torch.nn.GRU']:.1f} s)")
    ax.plot(steps, a, lw=1, ls="--",
            label=f"paraseq.nn.GRU ({times['paraseq.nn.GRU']:.1f} s)")
    ax.axhline(1 / 6, color="grey", lw=0.8, ls=":", label="predict the mean (1/6)")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("MSE")
    ax.set_title(f"Adding problem, T = {args.length}: the same curve "
                 f"(max rel. diff {diff:.1e})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"  plot saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
