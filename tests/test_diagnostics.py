"""paraseq.diagnostics: the Lyapunov exponent against cases with a known exponent, its three
Jacobian sources against each other; K*(T) from one run against separate solves of prefixes;
the auto guard; and bad input.

Shape letters: B batch, S random starts, T time, n input size, D state size.
"""

from __future__ import annotations

import math

import pytest
import torch

import paraseq
from paraseq import cells
from paraseq.diagnostics import lle as lyap_module
from paraseq.diagnostics import lyapunov

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: a second intra-op thread only adds wake-ups on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Linear(torch.nn.Module):
    """h_t = A h_{t-1} + x_t: J_t = A, so the exponent is log of A's spectral radius."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = torch.nn.Parameter(A)
        self.hidden_size = A.shape[0]

    def forward(self, x, h):
        return h @ self.A.T + x


def scaled(cell, gain: float, seed: int = 0):
    """The cell with its recurrent weight replaced by gain * N(0, 1 / H) entries."""
    g = torch.Generator().manual_seed(seed)
    H = cell.hidden_size
    with torch.no_grad():
        w = torch.randn(cell.weight_hh.shape, generator=g, dtype=F64) * gain / math.sqrt(H)
        cell.weight_hh.copy_(w)
    return cell


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- lyapunov


@pytest.mark.parametrize("radius", [0.6, 1.0, 1.7])
def test_linear_cell_exponent_is_log_spectral_radius(radius):
    D, T = 5, 1500
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen(1), dtype=F64))
    eig = torch.tensor([radius, -0.9 * radius, 0.5 * radius, 0.3, -0.1], dtype=F64)
    A = Q @ torch.diag(eig) @ Q.T  # symmetric: no transient growth
    x = torch.randn(2, T, D, generator=gen(2), dtype=F64)
    # J does not depend on the state, so any finite trajectory serves (radius > 1 diverges)
    res = lyapunov(Linear(A), x, h=torch.zeros(2, T, D, dtype=F64), generator=gen(3))
    assert res.exponent.shape == (2,)
    assert res.per_start.shape == (3, 2)
    assert res.log_growth.shape == (3, 2, T)
    torch.testing.assert_close(res.exponent, torch.full((2,), math.log(radius), dtype=F64),
                               atol=5e-3, rtol=0)
    assert bool((res.overshoot >= 1).all()) and bool((res.overshoot < 1.5).all())


def test_overshoot_of_a_non_normal_matrix():
    """[[0.5, 10], [0, 0.5]]: exponent log 0.5, but products grow by ~20x before they decay."""
    A = torch.tensor([[0.5, 10.0], [0.0, 0.5]], dtype=F64)
    T = 400
    x = torch.zeros(1, T, 2, dtype=F64)
    res = lyapunov(Linear(A), x, generator=gen())
    # the log-norm of A^T v decays like log 0.5 + O(log T / T)
    assert abs(res.exponent.item() - math.log(0.5)) < 0.05
    assert res.overshoot.item() > 5.0


@pytest.mark.parametrize("gain,sign", [(0.5, -1), (4.0, 1)])
def test_contracting_and_chaotic_elman(gain, sign):
    torch.manual_seed(0)
    cell = scaled(cells.ElmanCell(2, 32).double(), gain)
    x = 0.1 * torch.randn(2, 300, 2, generator=gen(4), dtype=F64)
    res = lyapunov(cell, x, generator=gen())
    assert bool((torch.sign(res.exponent) == sign).all()), res.exponent
    assert bool((res.exponent.abs() > 0.05).all())
    assert bool((res.spread < 0.02).all())


CELLS = [
    lambda: cells.ElmanCell(3, 6),
    lambda: cells.ElmanCell(3, 6, nonlinearity="relu"),
    lambda: cells.GRUCell(3, 6),
    lambda: cells.LSTMCell(3, 5),
    lambda: cells.DiagGRUCell(3, 6),
    lambda: cells.DiagLSTMCell(3, 5),
]


@pytest.mark.parametrize("make", CELLS)
def test_analytic_protocol_and_autograd_agree(make, monkeypatch):
    torch.manual_seed(0)
    cell = make()
    with torch.no_grad():
        cell.weight_hh.mul_(3.0)  # away from the trivially contracting regime
    x = torch.randn(2, 37, 3)  # float32: computed in float64 all the same
    ref = lyapunov(cell, x, jacobian="analytic", generator=gen(5))
    assert ref.method == "analytic" and ref.exponent.dtype == F64
    for source in ("protocol", "autograd"):
        other = lyapunov(cell, x, jacobian=source, generator=gen(5))
        torch.testing.assert_close(other.log_growth, ref.log_growth, atol=1e-11, rtol=0)
    monkeypatch.setattr(lyap_module, "_AUTOGRAD_DENSE_MAX", 0)  # one torch.func.jvp per step
    jvp = lyapunov(cell, x, jacobian="autograd", generator=gen(5))
    torch.testing.assert_close(jvp.log_growth, ref.log_growth, atol=1e-11, rtol=0)


def test_torch_cells_and_batch_dims():
    """torch.nn.LSTMCell (tuple state, autograd) matches paraseq's LSTMCell (analytic) with the
    same weights; batch dims (2, 3) come back as they went in."""
    torch.manual_seed(1)
    ref_cell = cells.LSTMCell(2, 4)
    torch_cell = torch.nn.LSTMCell(2, 4)
    torch_cell.load_state_dict(ref_cell.state_dict())
    x = torch.randn(2, 3, 25, 2)
    a = lyapunov(ref_cell, x, generator=gen(6))
    b = lyapunov(torch_cell, x, generator=gen(6))
    assert a.method == "analytic" and b.method == "autograd"
    assert a.exponent.shape == (2, 3) and a.log_growth.shape == (3, 2, 3, 25)
    torch.testing.assert_close(a.log_growth, b.log_growth, atol=1e-11, rtol=0)
    # one sequence alone gives its batch entry's exponent (other random starts: loosely)
    alone = lyapunov(ref_cell, x[1, 2], generator=gen(7))
    assert alone.exponent.shape == ()
    assert abs(alone.exponent.item() - a.exponent[1, 2].item()) < 0.1


def test_given_trajectory_equals_the_loop():
    cell = scaled(cells.GRUCell(2, 6).double(), 2.0)
    x = torch.randn(3, 50, 2, generator=gen(8), dtype=F64)
    h = paraseq.solve_recurrence(cell, x, method="sequential")  # the compiled loop
    a = lyapunov(cell, x, generator=gen(9))
    b = lyapunov(cell, x, h=h, generator=gen(9))
    torch.testing.assert_close(a.log_growth, b.log_growth, atol=1e-12, rtol=0)


def test_lyapunov_bad_input():
    cell = cells.ElmanCell(2, 4)
    x = torch.randn(1, 10, 2)
    with pytest.raises(ValueError, match="unknown jacobian 'exact'"):
        lyapunov(cell, x, jacobian="exact")
    with pytest.raises(ValueError, match=r"jacobian=.analytic.*RNNCell"):
        lyapunov(torch.nn.RNNCell(2, 4), x, jacobian="analytic")
    with pytest.raises(ValueError, match="jacobian='protocol'"):
        lyapunov(torch.nn.RNNCell(2, 4), x, jacobian="protocol")
    with pytest.raises(ValueError, match="starts must be an int >= 1; got 0"):
        lyapunov(cell, x, starts=0)
    with pytest.raises(ValueError, match=r"burn_in must be an int in \[0, T\)"):
        lyapunov(cell, x, burn_in=10)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., T, n\)"):
        lyapunov(cell, torch.randn(5))
    with pytest.raises(TypeError, match="floating point"):
        lyapunov(cell, torch.ones(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size"):
        lyapunov(lambda x, h: h, x)
    bad = x.clone()
    bad[0, 4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"sequence 0.*step 4: the inputs are not finite"):
        lyapunov(cell, bad)
    with pytest.raises(ValueError, match="h must have shape"):
        lyapunov(cell, x, h=torch.zeros(1, 9, 4))


# ----------------------------------------------------------------------------- iterations


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_iterations_one_run_equals_separate_prefix_solves(dtype, tmp_path):
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(2, 4).to(dtype)
    x = torch.randn(2, 101, 2, dtype=dtype)
    lengths = [1, 2, 3, 17, 50, 101]
    methods = ("newton", "quasi_newton", "jacobi")
    table = paraseq.diagnostics.iterations(cell, x, methods=methods, lengths=lengths)
    assert table.lengths == lengths and list(table.counts) == list(methods)
    for m in methods:
        for L, k in zip(lengths, table.counts[m], strict=True):
            _, info = paraseq.solve_recurrence(cell, x[:, :L], method=m, tol=table.tol,
                                               on_failure="raise", return_info=True)
            assert info.iterations == k, (m, L)
        assert table.counts[m] == sorted(table.counts[m])  # K*(T) never falls with T
    assert table.counts["newton"][-1] < table.counts["jacobi"][-1]
    text = table.format()
    assert text.splitlines()[0].split() == ["T", *methods]
    assert table.plot(tmp_path / "k.png").stat().st_size > 0


def test_iterations_damped_newton_and_caps():
    torch.manual_seed(1)
    cell = torch.nn.RNNCell(2, 3).double()
    x = torch.randn(1, 40, 2, dtype=F64)
    table = paraseq.diagnostics.iterations(cell, x, methods=("damped_newton", "jacobi"),
                                           lengths=[5, 40], max_iter=3)
    for L, k in zip([5, 40], table.counts["damped_newton"], strict=True):
        _, info = paraseq.solve_recurrence(cell, x[:, :L], method="damped_newton",
                                           max_iter=3, on_failure="warn", return_info=True)
        assert k == (info.iterations if info.converged else None)
    assert table.counts["jacobi"][-1] is None  # 40 steps need more than 3 Jacobi sweeps
    assert table.frontier["jacobi"][-1] < 40
    assert "-" in table.format()


def test_iterations_bad_input():
    cell = torch.nn.GRUCell(2, 4)
    x = torch.randn(1, 10, 2)
    it = paraseq.diagnostics.iterations
    with pytest.raises(ValueError, match="unknown parallel method 'sequential'"):
        it(cell, x, methods=["sequential"])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T\] = \[1, 10\]"):
        it(cell, x, lengths=[0, 5])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, T\]"):
        it(cell, x, lengths=[11])
    with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
        it(cell, x, max_iter=0)
    with pytest.raises(ValueError, match="jacobian must be"):
        it(cell, x, jacobian="hutchinson")
    with pytest.raises(TypeError, match="floating point tensor"):
        it(cell, [1, 2])


# ----------------------------------------------------------------------------- auto's guard


def elman(gain: float, D: int = 8):
    torch.manual_seed(0)
    cell = torch.nn.RNNCell(2, D)
    with torch.no_grad():
        cell.weight_hh.copy_(gain * torch.randn(D, D) / math.sqrt(D))
    return cell


def test_auto_takes_the_loop_on_a_chaotic_cell():
    """On a chaotic cell Newton's iterations grow with T: auto's guard reads a positive
    exponent on a short prefix and takes the loop (the deterministic proxy for "auto costs no
    more than 2x the loop": benchmarks/diagnostics.py times it)."""
    cell = elman(3.0)
    x = 0.1 * torch.randn(1, 1024, 2, generator=gen(0))
    assert paraseq.diagnostics.lyapunov(cell, x).exponent.item() > 0.02
    state = torch.get_rng_state()
    with torch.no_grad():
        h, info = paraseq.solve_recurrence(cell, x, return_info=True)
        ref = paraseq.solve_recurrence(cell, x, method="sequential")
    assert torch.equal(torch.get_rng_state(), state)  # the guard draws from its own generator
    assert info.method == "sequential" and info.lle is not None and info.lle > 0
    assert info.iterations == 0
    torch.testing.assert_close(h, ref)
    # forced, Newton crawls on the same problem: it stalls and falls back
    _, newton = paraseq.solve_recurrence(cell, x, method="newton", return_info=True)
    assert newton.fell_back


def test_auto_keeps_newton_on_a_contracting_cell():
    cell = elman(1.0)
    x = 0.1 * torch.randn(1, 1024, 2, generator=gen(0))
    with torch.no_grad():
        h, info = paraseq.solve_recurrence(cell, x, return_info=True)
        ref = paraseq.solve_recurrence(cell, x, method="sequential")
    assert info.method == "newton" and info.lle is not None and info.lle < 0
    assert info.converged and not info.fell_back
    torch.testing.assert_close(h, ref, atol=1e-5, rtol=1e-5)
    # the exponent on the prefix agrees with the full estimate
    full = paraseq.diagnostics.lyapunov(cell, x).exponent.item()
    assert abs(info.lle - full) < 0.1
    # the contraction ratio per iteration: Newton's falls fast
    c = info.contraction
    assert len(c) == info.iterations == len(info.residuals) - 1
    r = info.residuals
    assert c == [r[k + 1] / r[k] for k in range(len(r) - 1)]
    assert c[-1] < 0.1
    # short sequences skip the guard
    _, short = paraseq.solve_recurrence(cell, x[:, :200], return_info=True)
    assert short.lle is None


def test_product_exponent_equals_the_power_iteration():
    from paraseq.diagnostics.lle import power_iteration
    from paraseq.diagnostics.predict import product_exponent

    J = torch.randn(2, 37, 5, 5, generator=gen(1), dtype=F64)  # (B, L, D, D)
    V = torch.randn(3, 2, 5, generator=gen(2), dtype=F64)  # (S, B, D)
    V = V / V.norm(dim=-1, keepdim=True)
    logs = power_iteration(lambda t, v: (J[:, t] @ v.unsqueeze(-1)).squeeze(-1), V, 37)
    torch.testing.assert_close(product_exponent(J, V), logs.mean(-1), atol=1e-12, rtol=0)


def test_contraction_property():
    info = paraseq.SolveInfo(method="newton", residuals=[1.0, 0.5, 0.0, 0.0])
    assert info.contraction[:2] == [0.5, 0.0] and math.isnan(info.contraction[2])
    assert paraseq.SolveInfo(method="sequential").contraction == []


def test_diagnose_command(tmp_path, capsys):
    from paraseq.cli import main

    rc = main(["diagnose", "--cell", "elman", "--gains", "0.5", "4", "--lengths", "30", "130",
               "--methods", "newton", "damped_newton", "--max-iter", "20", "--out",
               str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("elman")]
    assert len(lines) == 2
    lle = [float(ln.split()[2]) for ln in lines]
    assert lle[0] < 0 < lle[1]  # contracting, then chaotic
    assert (tmp_path / "diagnose.png").stat().st_size > 0
