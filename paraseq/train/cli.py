"""``python -m paraseq train``: fit a classifier on one of aeon's bundled datasets, for a few
seeds, and print the test accuracy (mean +- std over the seeds)."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import CheckpointError, Config, load, plot, run
    from .published import describe

    if args.seeds < 1 or args.epochs < 1 or args.hidden < 1 or args.batch_size < 1:
        print("error: --seeds, --epochs, --hidden and --batch-size must be >= 1",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load(args.dataset, val_fraction=args.val_fraction, seed=args.split_seed)
    except (ImportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{data.name}: {len(data.train)} train / {len(data.val)} validation / "
          f"{len(data.test)} test series, {data.channels} channel(s), {len(data.classes)} "
          f"classes, length up to {data.max_length}"
          + (" (variable)" if data.variable_length else ""))
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        cfg = Config(dataset=args.dataset, model=args.model, method=args.method, seed=seed,
                     hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, patience=args.patience, val_fraction=args.val_fraction,
                     lle_every=args.lle_every, progress=not args.no_progress)
        folder = Path(args.out) / cfg.folder_name()
        try:
            res = run(cfg, data, folder, resume=args.resume)
        except (CheckpointError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not args.no_plot:
            plot(folder)
        results.append(res)
        print(f"seed {seed}: test accuracy {res['test_acc']:.4f} (best epoch "
              f"{res['best_epoch']} of {res['epochs_run']}, {res['seconds_per_epoch']:.2f} s "
              f"per epoch) -> {folder}")
    accs = [r["test_acc"] for r in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"test accuracy over {len(accs)} seed(s): {statistics.mean(accs):.4f} +- {std:.4f}")
    print(describe(args.dataset))
    return 0


def register(sub) -> None:
    from .model import MODELS, TRAIN_METHODS

    p = sub.add_parser("train", help="train a classifier on an aeon dataset (UCR/UEA, offline)")
    p.add_argument("--dataset", required=True, help="an aeon bundled dataset, e.g. GunPoint")
    p.add_argument("--model", choices=MODELS, default="gru")
    p.add_argument("--method", choices=TRAIN_METHODS, default="auto")
    p.add_argument("--seeds", type=int, default=1, help="runs with seeds seed .. seed+N-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--patience", type=int, default=5, help="early stopping (epochs)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--lle-every", type=int, default=20, help="steps between LLE estimates "
                                                            "(0: never)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="paraseq-out/train")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=cmd_train)
