"""Time series classification data: aeon's bundled UCR/UEA datasets (offline), split into
train / validation (stratified, from the dataset's own train set) and test (its test set),
z-scored per channel with the training split's statistics, and served as padded batches.

Shape letters: N series, T time (the longest in a batch), C channels, B batch.
aeon is an optional extra: ``pip install 'paraseq[data]'``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["INSTALL", "Dataset", "Split", "available", "batches", "load"]

INSTALL = "pip install 'paraseq[data]'  (or: pip install aeon)"


def _aeon():
    try:
        import aeon.datasets as ds
    except ImportError as err:
        raise ImportError(f"paraseq.train needs aeon for its datasets, which is not installed: "
                          f"{INSTALL}") from err
    return ds


def available() -> list[str]:
    """The classification datasets aeon ships with its package (no download; its bundled
    regression sets are left out)."""
    ds = _aeon()
    from aeon.datasets import tsc_datasets

    tsc = set(tsc_datasets.univariate) | set(tsc_datasets.multivariate) | {"UnitTest"}
    root = Path(ds.__file__).parent / "data"
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name in tsc and (p / f"{p.name}_TRAIN.ts").exists()
                  and (p / f"{p.name}_TEST.ts").exists())


@dataclass
class Split:
    """Series (a list of (T_i, C) float32 tensors) and labels (N,) int64."""

    series: list[Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.series)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    channels: int
    train: Split
    val: Split
    test: Split

    @property
    def variable_length(self) -> bool:
        lengths = {s.shape[0] for sp in (self.train, self.val, self.test) for s in sp.series}
        return len(lengths) > 1

    @property
    def max_length(self) -> int:
        return max(s.shape[0] for sp in (self.train, self.val, self.test) for s in sp.series)


def _series(X, split: str, name: str) -> list[Tensor]:
    """aeon's (N, C, T) array or list of (C, T_i) arrays -> list of (T_i, C) tensors, each
    checked for nan / inf."""
    out = []
    for i, x in enumerate(X):
        t = torch.as_tensor(x, dtype=torch.float32).reshape(-1, x.shape[-1]).T  # (T_i, C)
        if not bool(torch.isfinite(t).all()):
            bad = torch.nonzero(~torch.isfinite(t))[0].tolist()
            raise ValueError(f"dataset {name!r}: {split} sample {i} has a non-finite value "
                             f"(nan or inf) at time step {bad[0]}, channel {bad[1]}; clean or "
                             f"drop that sample (paraseq does not impute)")
        out.append(t.contiguous())
    return out


def from_arrays(name: str, X_train, y_train, X_test, y_test, *, val_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
    """A ``Dataset`` from aeon-style arrays ((N, C, T) or a list of (C, T_i)) and labels."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    train_all = _series(X_train, "train", name)
    test = _series(X_test, "test", name)
    classes = sorted({str(c) for c in y_train} | {str(c) for c in y_test})
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[str(c)] for c in y_train])
    yte = torch.tensor([index[str(c)] for c in y_test])
    # stratified: the same share of every class goes to validation (at least one per class
    # that has two or more training samples)
    g = torch.Generator().manual_seed(seed)
    val_idx: list[int] = []
    for c in range(len(classes)):
        members = torch.nonzero(ytr == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val_idx += members[:max(k, 0)].tolist()
    val_set = set(val_idx)
    tr_idx = [i for i in range(len(train_all)) if i not in val_set]
    val_idx = sorted(val_set)
    # z-score per channel with the training split's statistics
    cat = torch.cat([train_all[i] for i in tr_idx])  # (sum T, C)
    mean, std = cat.mean(0), cat.std(0).clamp_min(1e-8)

    def norm(xs):
        return [(x - mean) / std for x in xs]

    return Dataset(name=name, classes=classes, channels=cat.shape[1],
                   train=Split(norm([train_all[i] for i in tr_idx]), ytr[tr_idx]),
                   val=Split(norm([train_all[i] for i in val_idx]), ytr[val_idx]),
                   test=Split(norm(test), yte))


def load(name: str, *, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """One of aeon's bundled datasets (``available()``), split and normalised."""
    ds = _aeon()
    names = available()
    if name not in names:
        raise ValueError(f"unknown dataset {name!r}; the datasets aeon ships offline are: "
                         + ", ".join(names))
    X_train, y_train = ds.load_classification(name, split="train")
    X_test, y_test = ds.load_classification(name, split="test")
    return from_arrays(name, X_train, y_train, X_test, y_test, val_fraction=val_fraction,
                       seed=seed)


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None
            ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Shuffled (when a generator is given) batches of (x (B, T, C) zero-padded at the end,
    lengths (B,), labels (B,))."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else \
        torch.arange(n)
    out = []
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size].tolist()
        xs = [split.series[i] for i in idx]
        lengths = torch.tensor([x.shape[0] for x in xs])
        x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # (B, T, C)
        out.append((x, lengths, split.labels[idx]))
    return out


def n_batches(split: Split, batch_size: int) -> int:
    return math.ceil(len(split) / batch_size)
