"""paraseq.train: the loop on synthetic data (resume equals an uninterrupted run, checkpoints
from another run, corrupt checkpoints, NaN in the data, torch's twin from the same weights)
and on aeon's bundled datasets at tiny size (skipped where aeon is not installed).

Shape letters: N series, T time, C channels.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from paraseq import train
from paraseq.train import CheckpointError, Config, from_arrays


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(n=24, T=30, seed=0, variable=False):
    """Two classes: a noisy sine against noise, (N, C, T) arrays (or lists of (C, T_i))."""
    rng = np.random.default_rng(seed)

    def make(n):
        X, y = [], []
        for i in range(n):
            L = T - (i % 5) * 3 if variable else T
            c = i % 2
            t = np.arange(L)
            x = 0.3 * rng.standard_normal(L) + (np.sin(t / 3.0) if c else 0.0)
            X.append(x[None, :].astype(np.float32))
            y.append(str(c))
        return (X if variable else np.stack(X)), np.array(y)

    Xtr, ytr = make(n)
    Xte, yte = make(n)
    return from_arrays("Synthetic", Xtr, ytr, Xte, yte, seed=0)


def cfg(**kw):
    base = dict(dataset="Synthetic", model="gru", method="newton", hidden=4, epochs=3,
                batch_size=8, lr=1e-2, patience=10, lle_every=2, progress=False)
    return Config(**{**base, **kw})


def rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in csv.DictReader(f)]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = synthetic(variable=True)
    assert data.variable_length
    full = train.run(cfg(), data, tmp_path / "a")
    assert full["epochs_run"] == 3 and 0 <= full["test_acc"] <= 1
    # a kill mid-epoch 2 (after 4 of the 6 steps of two epochs): epoch 1 is checkpointed
    part = train.run(cfg(max_steps=4), data, tmp_path / "b")
    assert part == {"interrupted_at_step": 4}
    resumed = train.run(cfg(), data, tmp_path / "b", resume=True)
    for key in ("test_acc", "test_loss", "best_epoch", "steps"):
        assert resumed[key] == full[key], key
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # losses, iterations, LLE: all equal
    steps = [r for r in rows(tmp_path / "a") if r["kind"] == "step"]
    assert all(int(r["iterations"]) > 0 for r in steps)  # Newton ran, and says so
    assert any(r["lle"] for r in steps)
    assert train.plot(tmp_path / "a").stat().st_size > 0
    assert json.loads((tmp_path / "a" / "result.json").read_text())["test_acc"] == \
        full["test_acc"]


def test_checkpoint_of_another_run_changes_nothing(tmp_path):
    data = synthetic()
    train.run(cfg(epochs=1), data, tmp_path)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"another run.*hidden: checkpoint 4 vs asked 5"):
        train.run(cfg(epochs=2, hidden=5), data, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="already holds a run; pass --resume"):
        train.run(cfg(epochs=2), data, tmp_path)
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train.run(cfg(), data, tmp_path / "empty", resume=True)


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    data = synthetic()  # 19 training series, batches of 8: 3 steps an epoch
    train.run(cfg(), data, tmp_path / "ref")
    train.run(cfg(max_steps=7), data, tmp_path)  # epochs 1 and 2 are checkpointed
    prev = digest(tmp_path / "checkpoint.prev.pt")
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])  # truncated
    with pytest.warns(RuntimeWarning, match=r"corrupt or truncated.*checkpoint\.prev\.pt"):
        part = train.run(cfg(max_steps=7), data, tmp_path, resume=True)  # redoes epoch 2
    assert part == {"interrupted_at_step": 7}
    assert (tmp_path / "checkpoint.corrupt").exists()
    # the good previous checkpoint was kept: the new one replaced only the bad one
    assert digest(tmp_path / "checkpoint.prev.pt") == prev
    res = train.run(cfg(), data, tmp_path, resume=True)
    ref = json.loads((tmp_path / "ref" / "result.json").read_text())
    assert (res["test_acc"], res["test_loss"]) == (ref["test_acc"], ref["test_loss"])
    assert rows(tmp_path) == rows(tmp_path / "ref")
    # both bad: a clear error
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"checkpoint\.prev\.pt: not a paraseq checkpoint"):
        train.run(cfg(epochs=4), data, tmp_path, resume=True)


def test_nan_in_the_data_names_the_sample():
    X = np.zeros((6, 1, 10), dtype=np.float32)
    X[4, 0, 7] = np.nan
    y = np.array(["a", "b"] * 3)
    with pytest.raises(ValueError, match=r"train sample 4 has a non-finite value.*time step 7"):
        from_arrays("Bad", X, y, X[:2], y[:2])


def test_torch_twin_starts_from_the_same_weights():
    torch.manual_seed(3)
    ours = train.Classifier("gru", 2, 5, 3, "sequential", 40)
    torch.manual_seed(3)
    theirs = train.Classifier("gru", 2, 5, 3, "torch", 40)
    assert isinstance(theirs.body, torch.nn.GRU)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(4, 40, 2)
    lengths = torch.tensor([40, 33, 40, 7])
    torch.testing.assert_close(ours(x, lengths), theirs(x, lengths))
    with pytest.raises(ValueError, match=r"method='torch'.*gru and lstm only"):
        train.Classifier("diaggru", 2, 5, 3, "torch", 40)
    with pytest.raises(ValueError, match="unknown model 'mamba'"):
        train.Classifier("mamba", 2, 5, 3, "auto", 40)


@pytest.mark.parametrize("model", ["linear-attention", "s4"])
def test_causal_models_ignore_the_padding(model):
    """Series padded at the end and read at their own last step: the logits of each do not
    depend on what the padding holds (zeros or garbage), nor on the batch it is in (alone, at
    its own length, another form of the attention runs: T <= 128 the quadratic one, T = 150 the
    chunked one); a change inside a series does change its logits."""
    torch.manual_seed(0)
    clf = train.Classifier(model, 2, 8, 3, "auto", 150).double().eval()
    lengths = torch.tensor([150, 37, 100, 5])
    x = torch.randn(4, 150, 2, dtype=torch.float64)
    pad = torch.arange(150)[None, :] >= lengths[:, None]  # (B, T)
    x[pad] = 0.0
    garbage = x.clone()
    garbage[pad] = 100 * torch.randn(int(pad.sum()), 2, dtype=torch.float64)
    with torch.no_grad():
        ref = clf(x, lengths)  # (B, K)
        torch.testing.assert_close(clf(garbage, lengths), ref, rtol=1e-12, atol=1e-12)
        for i, n in enumerate(lengths.tolist()):
            alone = clf(x[i:i + 1, :n], lengths[i:i + 1])
            torch.testing.assert_close(alone, ref[i:i + 1], rtol=1e-10, atol=1e-12)
        inside = x.clone()
        inside[1, 30] += 1.0  # step 30 of the series of length 37
        moved = clf(inside, lengths)
    assert (moved[1] - ref[1]).abs().max() > 1e-6
    torch.testing.assert_close(moved[[0, 2, 3]], ref[[0, 2, 3]], rtol=0, atol=0)


def test_linear_attention_trains_on_variable_length_data(tmp_path):
    data = synthetic(variable=True)
    res = train.run(cfg(model="linear-attention", method="auto", hidden=8, epochs=2), data,
                    tmp_path)
    assert res["epochs_run"] == 2 and 0 <= res["test_acc"] <= 1
    steps = [r for r in rows(tmp_path) if r["kind"] == "step"]
    # no nonlinear recurrence: no Newton iterations, and no cell whose exponent to track
    assert all(r["iterations"] == "0" for r in steps)
    assert {r["lle"] for r in steps} <= {"", "nan"}
    with pytest.raises(ValueError, match=r"method='torch'.*gru and lstm only"):
        train.Classifier("linear-attention", 2, 8, 3, "torch", 40)


def test_aeon_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "aeon", None)
    monkeypatch.setitem(sys.modules, "aeon.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'paraseq\[data\]'"):
        train.load("GunPoint")


# ----------------------------------------------------------------------------- real data


def test_bundled_dataset_trains(tmp_path):
    pytest.importorskip("aeon")
    data = train.load("UnitTest")
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 22
    res = train.run(cfg(dataset="UnitTest", epochs=2, hidden=4), data, tmp_path)
    assert res["epochs_run"] == 2 and 0 <= res["test_acc"] <= 1


def test_bundled_variable_length_dataset():
    pytest.importorskip("aeon")
    data = train.load("JapaneseVowels")
    assert data.variable_length and data.channels == 12 and len(data.classes) == 9
    x, lengths, _ = train.data.batches(data.test, 8)[0]
    assert x.shape[0] == 8 and int(lengths.max()) == x.shape[1]


def test_unknown_dataset_lists_the_available_ones():
    pytest.importorskip("aeon")
    with pytest.raises(ValueError, match=r"unknown dataset 'NoSuch'.*GunPoint"):
        train.load("NoSuch")


# The child's stall: a sitecustomize module (imported by Python at start-up, from PYTHONPATH)
# that wraps Adam's step. At the optimizer step STALL_AT it writes a marker file and sleeps
# instead of stepping: steps 1 .. STALL_AT - 1 are done and in the metrics, the run is
# mid-epoch, and the kill lands at a known point whatever the machine's speed.
STALL = """
import os, pathlib, time
import torch

_step, _count = torch.optim.Adam.step, [0]


def step(self, *args, **kwargs):
    _count[0] += 1
    if _count[0] == int(os.environ["PARASEQ_TEST_STALL_AT"]):
        pathlib.Path(os.environ["PARASEQ_TEST_STALL_MARKER"]).write_text("stalled")
        time.sleep(600)
    return _step(self, *args, **kwargs)


torch.optim.Adam.step = step
"""

REPO = Path(__file__).resolve().parent.parent


def test_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    """``python -m paraseq train`` on a real dataset, killed with SIGKILL mid-epoch 2 (epoch 1
    checkpointed, steps of epoch 2 already in the metrics), then ``--resume``: the metrics,
    the final weights and the test accuracy equal an uninterrupted run's, bit for bit (CPU)."""
    pytest.importorskip("aeon")
    from paraseq.cli import main

    # UnitTest: 16 training series, batches of 4: 4 steps an epoch
    args = ["train", "--dataset", "UnitTest", "--model", "gru", "--method", "newton",
            "--hidden", "4", "--epochs", "3", "--batch-size", "4", "--lle-every", "3",
            "--patience", "10", "--threads", "1", "--no-progress", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    (hook := tmp_path / "hook").mkdir()
    (hook / "sitecustomize.py").write_text(STALL)
    marker = tmp_path / "stalled"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
           "PARASEQ_TEST_STALL_AT": "7", "PARASEQ_TEST_STALL_MARKER": str(marker)}
    cmd = [sys.executable, "-m", "paraseq", *args, "--out", str(tmp_path / "run")]
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the run ended before its stall (exit {child.returncode}):\n"
                            f"{child.stderr.read()}")
            assert time.monotonic() < deadline, "the run did not reach its stall in 120 s"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    folder = tmp_path / "run" / "UnitTest_gru_newton_seed0"
    killed = rows(folder)
    assert [r["step"] for r in killed if r["kind"] == "step"] == [str(i) for i in range(1, 7)]
    assert (folder / "checkpoint.pt").exists() and not (folder / "result.json").exists()

    # the resume runs here (the same command line's code; a second child would only add
    # another start-up of torch and aeon)
    assert main([*args, "--out", str(tmp_path / "run"), "--resume"]) == 0
    ref = tmp_path / "ref" / "UnitTest_gru_newton_seed0"
    assert rows(folder) == rows(ref)  # losses, accuracies, Newton iterations, LLE
    a, b = (json.loads((f / "result.json").read_text()) for f in (folder, ref))
    assert (a["test_acc"], a["test_loss"], a["steps"]) == (b["test_acc"], b["test_loss"], 12)
    wa, wb = (train.loop.read_checkpoint(f / "checkpoint.pt") for f in (folder, ref))
    for k, v in wb["model"].items():
        assert torch.equal(wa["model"][k], v), k
    for k, v in wb["best"]["state"].items():
        assert torch.equal(wa["best"]["state"][k], v), k


def test_published_accuracies_are_read_offline(monkeypatch):
    """The reference accuracies aeon ships, read with no network: the same numbers aeon's own
    loader reads from those files; none for a dataset they do not cover."""
    pytest.importorskip("aeon")
    import socket

    def no_network(*args, **kwargs):
        raise OSError("the network is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from aeon.benchmarking.results_loaders import get_estimator_results

    from paraseq.train.published import ESTIMATORS, _folder, describe

    figures = train.published("OSULeaf")
    assert [p.estimator for p in figures] == list(ESTIMATORS)
    theirs = get_estimator_results(list(ESTIMATORS), datasets=["OSULeaf"], num_resamples=None,
                                   path=str(_folder().parent.parent))
    for p in figures:
        accs = theirs[p.estimator]["OSULeaf"]
        assert p.resamples == len(accs) == 30  # (pandas' fast parser may differ by an ulp)
        assert p.default_split == pytest.approx(float(accs[0]), rel=1e-15)
        assert p.mean == pytest.approx(float(np.mean(accs)), rel=1e-12)
    assert train.published("JapaneseVowels") == []
    assert "none ship offline" in describe("JapaneseVowels")
    assert "HC2 " in describe("OSULeaf") and "quoted" in describe("OSULeaf")


def test_drift_into_chaos_shows_in_the_metrics_and_the_solver_copes():
    """A GRU whose recurrent weights grew into chaos (weight_hh x 12, as training can drift,
    ELK's observation): the metrics' LLE column reads positive, the solve reports its fallback,
    and the states it returns are a true trajectory of the cell (each step the cell applied to
    the previous state, to float32 rounding), never Newton's unconverged iterate. Against
    torch.nn.GRU itself no comparison is possible here: on a chaotic cell two correct float32
    loops part by O(1) within a few hundred steps (rounding grows like e^(LLE t))."""
    from paraseq.train.loop import _lle
    from paraseq.train.model import Classifier

    torch.manual_seed(0)
    T, N, H = 300, 4, 16
    model = Classifier("gru", 1, H, 2, "newton", T)
    with torch.no_grad():
        model.body.weight_hh_l0.mul_(12.0)
    x = torch.randn(N, T, 1)  # (N, T, C)
    with torch.no_grad():
        model(x, torch.full((N,), T))
        iterations, fallbacks = model.solve_stats()
        assert fallbacks >= 1 and iterations > 0
        assert _lle(model, x[0], T, step=1) > 0
        out, _ = model.body(x)  # (N, T, H): the states the classifier read
    cell = torch.nn.GRUCell(1, H).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.body, f"{name}_l0"))
        prev = torch.cat([torch.zeros(N, 1, H), out[:, :-1]], dim=1).double()  # (N, T, H)
        step = cell(x.double().reshape(N * T, 1), prev.reshape(N * T, H)).reshape(N, T, H)
    assert float((step - out.double()).abs().max()) < 1e-5
