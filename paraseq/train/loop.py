"""The training loop: Adam on cross-entropy, early stopping on the validation loss, a metrics
CSV, checkpoints written atomically after every epoch, and ``resume`` that continues a killed
run exactly (on CPU: the same data order, optimizer state and RNG state, so the same numbers
as the uninterrupted run).

A run lives in one folder: ``metrics.csv`` (a row per step and per epoch), ``checkpoint.pt``
and ``checkpoint.prev.pt`` (the epoch before), ``result.json`` and ``plot.png`` at the end.
Each checkpoint file starts with the SHA-256 of its payload, so a truncated or corrupt file is
detected on resume; the previous good one is used then, and kept.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import Dataset, batches
from .model import Classifier, recurrent_cell

__all__ = ["CheckpointError", "Config", "run"]

FORMAT = 1
COLUMNS = ["kind", "epoch", "step", "loss", "acc", "seconds", "iterations", "fallbacks", "lle",
           "val_loss", "val_acc", "epoch_seconds"]
IDENTITY = ("dataset", "model", "method", "seed", "hidden", "batch_size", "lr", "val_fraction")
"""The settings a checkpoint must share with the run that resumes it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, or from another run)."""


@dataclass
class Config:
    dataset: str
    model: str = "gru"
    method: str = "auto"
    seed: int = 0
    hidden: int = 16
    epochs: int = 30
    batch_size: int = 16
    lr: float = 3e-3
    patience: int = 5
    val_fraction: float = 0.2
    lle_every: int = 20
    progress: bool = True
    max_steps: int | None = None  # stop after this many steps (tests: a kill mid-epoch)

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in IDENTITY}

    def folder_name(self) -> str:
        return f"{self.dataset}_{self.model}_{self.method}_seed{self.seed}"


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, state: dict, rotate: bool) -> None:
    """Write checkpoint.pt atomically (a temporary file, fsync, rename); the one it replaces
    becomes checkpoint.prev.pt when ``rotate`` (it was a good one)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    tmp = folder / "checkpoint.tmp"
    with open(tmp, "wb") as f:
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    current = folder / "checkpoint.pt"
    if rotate and current.exists():
        os.replace(current, folder / "checkpoint.prev.pt")
    os.replace(tmp, current)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's state, or CheckpointError saying what is wrong with the file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    digest, sep, payload = raw.partition(b"\n")
    if not sep or len(digest) != 64:
        raise CheckpointError(f"{path}: not a paraseq checkpoint (no checksum header)")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: corrupt or truncated (checksum mismatch, "
                              f"{len(payload)} bytes)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=False)
    except Exception as err:  # a payload that passed the checksum but does not load
        raise CheckpointError(f"{path}: does not load ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a paraseq training checkpoint of format {FORMAT}")
    return state


def load_for_resume(folder: Path, cfg: Config) -> tuple[dict, bool]:
    """(state, whether checkpoint.pt itself was good). A corrupt checkpoint.pt is renamed
    checkpoint.corrupt and checkpoint.prev.pt used; a checkpoint of another run raises."""
    current, prev = folder / "checkpoint.pt", folder / "checkpoint.prev.pt"
    try:
        state, good = read_checkpoint(current), True
    except CheckpointError as err:
        if not prev.exists():
            raise CheckpointError(f"cannot resume: {err}, and there is no previous checkpoint "
                                  f"({prev.name}); start afresh in another folder") from None
        state, good = read_checkpoint(prev), False
        warnings.warn(f"{err}; resuming from {prev.name} (one epoch earlier); the bad file is "
                      f"kept as checkpoint.corrupt", RuntimeWarning, stacklevel=3)
    theirs, ours = state["identity"], cfg.identity()
    if theirs != ours:
        diff = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs asked {ours[k]!r}"
                         for k in ours if theirs.get(k) != ours[k])
        raise CheckpointError(f"the checkpoint in {folder} is from another run ({diff}); "
                              f"nothing was changed: resume with the same settings or choose "
                              f"another --out")
    if not good:
        os.replace(current, folder / "checkpoint.corrupt")
    return state, good


# ----------------------------------------------------------------------------- the loop


@torch.no_grad()
def evaluate(model: Classifier, split, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over a split."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, lengths, y in batches(split, batch_size):
        logits = model(x, lengths)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    model.train()
    return loss / max(n, 1), correct / max(n, 1)


def _lle(model: Classifier, x: torch.Tensor, length: int, step: int) -> float:
    from ..diagnostics import lyapunov

    cell = recurrent_cell(model)
    if cell is None:
        return math.nan
    g = torch.Generator().manual_seed(step)  # its own draws: the run's RNG is untouched
    return float(lyapunov(cell, x[:length].unsqueeze(0), starts=2, generator=g).exponent)


def _truncate_csv(path: Path, rows: int) -> None:
    """Keep the header and the first ``rows`` rows (those the checkpoint had seen)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(lines[:rows + 1])


def run(cfg: Config, data: Dataset, folder: str | Path, *, resume: bool = False) -> dict:
    """Train one model on ``data`` in ``folder``; returns the result (also result.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.csv"
    if resume and (folder / "checkpoint.pt").exists():
        state, rotate = load_for_resume(folder, cfg)
    elif resume:
        raise CheckpointError(f"--resume: no checkpoint in {folder}; run without --resume to "
                              f"start")
    elif (folder / "checkpoint.pt").exists() or metrics.exists():
        raise CheckpointError(f"{folder} already holds a run; pass --resume to continue it, or "
                              f"choose another --out (nothing was overwritten)")
    else:
        state, rotate = None, False

    torch.manual_seed(cfg.seed)
    model = Classifier(cfg.model, data.channels, cfg.hidden, len(data.classes), cfg.method,
                       data.max_length)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    epoch, step, rows, elapsed = 0, 0, 0, 0.0
    best = {"val_loss": math.inf, "epoch": -1, "state": None}
    bad_epochs, stopped = 0, False
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        epoch, step, rows, elapsed = state["epoch"], state["step"], state["rows"], \
            state["elapsed"]
        best, bad_epochs, stopped = state["best"], state["bad_epochs"], state["stopped"]
        _truncate_csv(metrics, rows)
    if not metrics.exists():
        with open(metrics, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)

    from tqdm import tqdm

    def write(row: dict) -> None:
        nonlocal rows
        with open(metrics, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in COLUMNS])
            f.flush()
        rows += 1

    nb = math.ceil(len(data.train) / cfg.batch_size)
    while epoch < cfg.epochs and not stopped:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # data order
        bar = tqdm(batches(data.train, cfg.batch_size, gen), total=nb, disable=not cfg.progress,
                   desc=f"{cfg.folder_name()} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        t_epoch = time.perf_counter()
        for x, lengths, y in bar:
            t0 = time.perf_counter()
            logits = model(x, lengths)
            iters, falls = model.solve_stats()
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            elapsed += time.perf_counter() - t0
            step += 1
            lle = _lle(model, x[0], int(lengths[0]), step) \
                if cfg.lle_every and step % cfg.lle_every == 0 else ""
            acc = float((logits.argmax(-1) == y).float().mean())
            write({"kind": "step", "epoch": epoch + 1, "step": step, "loss": f"{loss.item():.6g}",
                   "acc": f"{acc:.4g}", "seconds": f"{elapsed:.4g}", "iterations": iters,
                   "fallbacks": falls, "lle": lle if lle == "" else f"{lle:.5g}"})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if cfg.max_steps is not None and step >= cfg.max_steps:
                bar.close()
                return {"interrupted_at_step": step}
        bar.close()
        epoch += 1
        val_loss, val_acc = evaluate(model, data.val, cfg.batch_size)
        write({"kind": "epoch", "epoch": epoch, "step": step, "seconds": f"{elapsed:.4g}",
               "val_loss": f"{val_loss:.6g}", "val_acc": f"{val_acc:.4g}",
               "epoch_seconds": f"{time.perf_counter() - t_epoch:.4g}"})
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
            stopped = bad_epochs >= cfg.patience
        save_checkpoint(folder, {
            "format": FORMAT, "identity": cfg.identity(), "epoch": epoch, "step": step,
            "rows": rows, "elapsed": elapsed, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "best": best,
            "bad_epochs": bad_epochs, "stopped": stopped}, rotate=rotate)
        rotate = True
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    test_loss, test_acc = evaluate(model, data.test, cfg.batch_size)
    result = {**dataclasses.asdict(cfg), "test_acc": test_acc, "test_loss": test_loss,
              "best_epoch": best["epoch"], "epochs_run": epoch, "steps": step,
              "train_seconds": elapsed, "seconds_per_epoch": elapsed / max(epoch, 1),
              "early_stopped": stopped}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def plot(folder: str | Path) -> Path | None:
    """Training loss per step, validation accuracy per epoch and the cell's exponent."""
    folder = Path(folder)
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([int(r["step"]) for r in steps], [float(r["loss"]) for r in steps], lw=0.8)
    axes[0].set(xlabel="step", ylabel="training loss", yscale="log")
    axes[1].plot([int(r["epoch"]) for r in epochs], [float(r["val_acc"]) for r in epochs], "o-")
    axes[1].set(xlabel="epoch", ylabel="validation accuracy")
    pts = [(int(r["step"]), float(r["lle"])) for r in steps if r["lle"] not in ("", "nan")]
    if pts:
        axes[2].plot(*zip(*pts, strict=True), "o-", ms=3)
    axes[2].axhline(0.0, color="k", lw=0.8, ls="--")
    axes[2].set(xlabel="step", ylabel="LLE of the first layer's cell")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(folder.name)
    fig.tight_layout()
    path = folder / "plot.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
