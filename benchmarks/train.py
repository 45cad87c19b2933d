"""paraseq.nn.GRU (method auto and forced newton) against torch.nn.GRU from the same initial
weights on the same batches, on aeon's bundled UCR/UEA datasets: test accuracy (mean +- std
over seeds), time per epoch, Newton iterations per step, and the published accuracies aeon
ships for the dataset (quoted, see paraseq.train.published). Needs aeon (pip install
'paraseq[data]').

    python benchmarks/train.py [--quick] [--datasets A B ...] [--seeds N] [--epochs E]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paraseq import train
from paraseq.bench import cpu_name, format_table
from paraseq.train.published import describe, published

METHODS = ("auto", "newton", "torch")
HEADER = ["dataset", "model", "test accuracy", "s / epoch", "iterations / step",
          "published (default split; quoted)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one dataset, one seed, 2 epochs")
    p.add_argument("--datasets", nargs="+",
                   default=["BasicMotions", "GunPoint", "ItalyPowerDemand", "JapaneseVowels"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--patience", type=int, default=5, help="early stopping (epochs)")
    p.add_argument("--out", default=None, help="folder for the runs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.epochs = ["GunPoint"], 1, 2
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="paraseq-train-"))
    print(f"{datetime.date.today()}, {cpu_name()}, 1 torch thread, load average "
          f"{os.getloadavg()[0]:.1f}; GRU hidden {args.hidden}, Adam 3e-3, batch 16, up to "
          f"{args.epochs} epochs (early stopping, patience {args.patience}), {args.seeds} "
          f"seeds; runs in {out}\n")
    rows = []
    for name in args.datasets:
        data = train.load(name)
        quoted = ", ".join(f"{f.estimator} {f.default_split:.3f}" for f in published(name)
                           if f.estimator in ("HC2", "InceptionTime")) or "none offline"
        for method in METHODS:
            accs, secs, iters = [], [], []
            for seed in range(args.seeds):
                cfg = train.Config(dataset=name, model="gru", method=method, seed=seed,
                                   hidden=args.hidden, epochs=args.epochs, progress=False,
                                   patience=args.patience,
                                   lle_every=0)
                folder = out / cfg.folder_name()
                res = train.run(cfg, data, folder, resume=(folder / "checkpoint.pt").exists())
                accs.append(res["test_acc"])
                # time per epoch without the first (numba's compile or cache load lands there)
                with open(folder / "metrics.csv", newline="") as f:
                    recs = list(csv.DictReader(f))
                ep = [float(r["epoch_seconds"]) for r in recs if r["kind"] == "epoch"]
                secs.append(statistics.median(ep[1:] if len(ep) > 1 else ep))
                st = [int(r["iterations"]) for r in recs if r["kind"] == "step"]
                iters.append(sum(st) / max(len(st), 1))
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append([name + (" (variable length)" if data.variable_length else ""),
                         "torch.nn.GRU" if method == "torch" else f"paraseq GRU {method}",
                         f"{statistics.mean(accs):.3f} +- {std:.3f}",
                         f"{statistics.median(secs):.2f}", f"{statistics.mean(iters):.1f}",
                         quoted if method == METHODS[0] else ""])
            print(format_table(HEADER, rows[-1:], markdown=True).splitlines()[-1], flush=True)
    print()
    print(format_table(HEADER, rows, markdown=True))
    print()
    for name in args.datasets:
        print(describe(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
