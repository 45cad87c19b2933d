"""paraseq.bench.peers: the peers of ``python -m paraseq bench`` (JAX, DEER, pararnn-torch).

None of the peers is a dependency: without them the tests check detection, the "not installed"
columns, the CSV and the CLI flags; with them installed (importorskip) they check that each
adapter computes the same function as the grid row's torch module."""

from __future__ import annotations

import csv
import importlib.util
import sys
import types

import pytest
import torch

from paraseq.bench import grid, peers
from paraseq.cli import main

ABSENT = {n: peers.PeerInfo(n, False, f"{peers.NOT_INSTALLED} (test)") for n in peers.PEERS}


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_detect_says_not_installed(monkeypatch):
    for name in ("jax", "pararnn", "deer"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
    found = peers.detect()
    assert list(found) == list(peers.PEERS)
    for info in found.values():
        assert not info.available and info.label.startswith("not installed")


def test_detect_rejects_unknown_peers():
    with pytest.raises(ValueError, match=r"unknown peer.*'flax'.*jax"):
        peers.detect(["jax", "flax"])


def test_detect_refuses_another_package_named_deer(monkeypatch):
    # the PyPI package "deer" is a reinforcement-learning framework without fseq1d
    monkeypatch.setitem(sys.modules, "deer", types.ModuleType("deer"))
    info = peers.detect(["deer"])["deer"]
    assert not info.available and info.label.startswith("not installed")
    if _has("jax"):
        assert "not machine-discovery/deer" in info.label


def test_deer_memory_estimate_covers_the_issue_cells():
    # measured here: 2.4 GB (fwd) and 3.2 GB (fwd+bwd) at H 32, B 16, T 1e4; 2.3 GB at H 8,
    # B 16, T 1e5; the estimate must be at least that, and the big cells must be skipped
    assert peers.deer_bytes(32, 16, 10_000, False) >= 2.4e9
    assert peers.deer_bytes(32, 16, 10_000, True) >= 3.2e9
    assert peers.deer_bytes(8, 16, 100_000, False) >= 2.3e9
    for cell in ((1, 16, 100_000), (8, 16, 10_000), (8, 1, 100_000), (32, 16, 10_000)):
        assert peers.deer_bytes(*cell, False) < peers.DEER_MEMORY_BYTES
    assert peers.deer_bytes(64, 16, 100_000, False) > peers.DEER_MEMORY_BYTES
    assert peers.deer_bytes(8, 16, 1000, True) > peers.deer_bytes(8, 16, 1000, False)


class _ParaGRULike(torch.nn.Module):
    """pararnn-torch's ParaGRU(mix="diag") equations (its cells/para_gru.py docstrings), as the
    reference the weight mapping must reproduce: W_x rows z, r, n; a_* clamped to +-0.5;
    z = sigmoid(a_z h + zx), r = sigmoid(a_r h + rx), n = tanh(a_n (h r) + nx),
    h' = h + z (n - h)."""

    def __init__(self, n: int, H: int, dtype=torch.float64):
        super().__init__()
        self.input_size, self.hidden_size = n, H
        self.W_x = torch.nn.Linear(n, 3 * H, dtype=dtype)
        self.a = torch.nn.Parameter(torch.randn(3, H, dtype=dtype))  # some beyond the clamp

    def clipped_a(self):
        return tuple(self.a.clamp(-0.5, 0.5))

    def step(self, h, x):
        zx, rx, nx = self.W_x(x).chunk(3, dim=-1)
        a_z, a_r, a_n = self.clipped_a()
        z = torch.sigmoid(a_z * h + zx)
        r = torch.sigmoid(a_r * h + rx)
        n = torch.tanh(a_n * (h * r) + nx)
        return torch.lerp(h, n, z)

    def loop(self, x):  # x (B, T, n) -> (B, T, H), h0 = 0
        h = x.new_zeros(x.shape[0], self.hidden_size)
        out = []
        for t in range(x.shape[1]):
            h = self.step(h, x[:, t])
            out.append(h)
        return torch.stack(out, 1)


@pytest.mark.parametrize("method", ["sequential", "auto", "quasi_newton"])
def test_diag_gru_from_paragru_is_the_same_function(method):
    torch.manual_seed(0)
    cell = _ParaGRULike(3, 5)
    x = torch.randn(2, 37, 3, dtype=torch.float64)  # (B, T, n)
    m = peers.diag_gru_from_paragru(cell, method=method)
    assert m.weight_ih_l0.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], cell.loop(x), rtol=0, atol=1e-12)


def test_grid_row_with_no_peer_installed_says_so(tmp_path):
    w = grid.Workload(2, 2, 30, False)
    r = grid.measure(w, repeats=1, budget=1.0, history={}, skip_after=60.0, peers=ABSENT)
    assert r.peers is not None
    assert (r.peers.jax_status, r.peers.deer_status, r.peers.pararnn_status) == (
        peers.NOT_INSTALLED,) * 3
    text = grid.peer_table([r])
    assert "not installed" in text and "auto/jax" in text and "ParaGRU(diag)" in text
    assert grid.peer_summary([r]) == []  # no ratio without a peer's time
    grid.write_csv([r], tmp_path / "bench.csv")
    row = next(csv.DictReader((tmp_path / "bench.csv").open()))
    assert row["jax_status"] == "not installed" and row["pararnn_s"] == ""
    assert float(row["max_err"]) < 1e-5


def test_grid_without_peers_keeps_its_csv(tmp_path):
    r = grid.measure(grid.Workload(1, 1, 20, False), repeats=1, budget=1.0, history={},
                     skip_after=60.0)
    assert r.peers is None and grid.peer_table([r]) == ""
    grid.write_csv([r], tmp_path / "bench.csv")
    header = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")
    assert "jax_s" not in header and "peers" not in header and "speedup" in header


BENCH = ["bench", "--sections", "gru", "--hidden", "2", "--lengths", "40", "--batches", "1",
         "--passes", "fwd", "--repeats", "1", "--no-plot"]


def test_cli_peers_flags(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_detect(names=peers.PEERS):
        calls.append(1)
        return ABSENT

    monkeypatch.setattr(peers, "detect", fake_detect)
    assert main([*BENCH, "--out", str(tmp_path), "--no-peers"]) == 0
    assert calls == [] and "peers:" not in capsys.readouterr().out
    assert main([*BENCH, "--out", str(tmp_path)]) == 0  # default: look for them
    out = capsys.readouterr().out
    assert calls == [1] and "peers: not installed (test)" in out
    assert "Peers on the same workloads" not in out  # nothing installed: no second table
    assert main([*BENCH, "--out", str(tmp_path), "--peers"]) == 0
    assert calls == [1, 1]


def _row_with(name: str, w: grid.Workload) -> grid.Result:
    found = peers.detect([name])
    if not found[name].available:
        pytest.skip(found[name].label)
    return grid.measure(w, repeats=1, budget=1.0, history={}, skip_after=60.0, peers=found)


@pytest.mark.parametrize("backward", [False, True])
def test_jax_scan_gru_is_torch_gru(backward):
    pytest.importorskip("jax")
    r = _row_with("jax", grid.Workload(3, 2, 57, backward))
    p = r.peers
    assert p.jax_status == "ok", p.jax_status
    assert p.jax_s > 0 and p.jax_err < 1e-5  # outputs (and fwd+bwd: input gradient)
    assert p.deer_status == p.pararnn_status == peers.NOT_INSTALLED  # not asked for
    assert "auto/jax" in grid.peer_table([r])


def test_jax_scan_gru_against_a_float64_torch_gru():
    jax = pytest.importorskip("jax")
    _, scan_gru, _ = peers._jax_fns()
    torch.manual_seed(1)
    ref = torch.nn.GRU(4, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 29, 4, dtype=torch.float64)
    params = tuple(peers._to_jax(jax, p.float()) for p in (ref.weight_ih_l0, ref.weight_hh_l0,
                                                           ref.bias_ih_l0, ref.bias_hh_l0))
    xt = x.float().transpose(0, 1).contiguous()  # (T, B, H): the scan is time-major
    got = peers._torch(scan_gru(params, peers._to_jax(jax, xt))).transpose(0, 1)
    with torch.no_grad():
        want = ref(x)[0]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backward", [False, True])
def test_deer_gru_is_torch_gru(backward):
    pytest.importorskip("jax")
    r = _row_with("deer", grid.Workload(2, 2, 45, backward))
    p = r.peers
    assert p.deer_status == "ok", p.deer_status
    assert p.deer_converged and p.deer_err < 1e-4  # DEER's own float32 tolerance


@pytest.mark.parametrize("backward", [False, True])
def test_pararnn_paragru_against_diag_gru(backward):
    pytest.importorskip("pararnn")
    r = _row_with("pararnn", grid.Workload(3, 2, 50, backward))
    p = r.peers
    assert p.pararnn_status == "ok", p.pararnn_status
    assert p.pararnn_s > 0 and p.diag_auto_s > 0 and p.diag_parallel_s > 0
    assert p.diag_err < 1e-4 and 1 <= p.pararnn_iters <= 3
    assert "ParaGRU/DiagGRU" in grid.peer_table([r])


def test_pararnn_real_paragru_mapping():
    pytest.importorskip("pararnn")
    from pararnn import ParaGRU, ParaRNN

    torch.manual_seed(2)
    cell = ParaGRU(4, 6, dtype=torch.float64)
    with torch.no_grad():
        cell.a_z.mul_(3.0)  # some entries beyond the 0.5 clamp
    x = torch.randn(2, 33, 4, dtype=torch.float64)
    with torch.no_grad():
        want = ParaRNN(cell, solver="sequential")(x)
        got = peers.diag_gru_from_paragru(cell, method="sequential")(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
