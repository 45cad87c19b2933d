"""User-written cells (no analytic Jacobians) in solve_recurrence: torch.func's forward-mode
Jacobians against autograd's, the compiled path (paraseq.solve.jit) and its fallback, the
Newton iteration's speculative last step, iteration counts over time chunks, and the auto
rule; every result against the float64 loop, gradients against autograd through the loop.

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paraseq
from paraseq.solve import api as solve_api
from paraseq.solve import iterate, jit
from paraseq.solve.cell import FlatCell, StateLayout
from paraseq.solve.methods import METHODS

F64 = torch.float64


@pytest.fixture(autouse=True)
def _forward_mode_on_small_problems(monkeypatch):
    """The tests' problems are small: torch.func's path is taken at every size here."""
    monkeypatch.setattr("paraseq.solve.cell.FUNC_MIN_WORK", 0)


class HandGRU(torch.nn.Module):
    """torch.nn.GRUCell's equations by hand."""

    def __init__(self, n, D, dtype=F64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        ref = torch.nn.GRUCell(n, D, dtype=dtype)
        self.hidden_size = D
        self.w_ih, self.w_hh, self.b_ih, self.b_hh = (ref.weight_ih, ref.weight_hh, ref.bias_ih,
                                                      ref.bias_hh)

    def forward(self, x, h):
        i_r, i_z, i_n = Fn.linear(x, self.w_ih, self.b_ih).chunk(3, -1)
        h_r, h_z, h_n = Fn.linear(h, self.w_hh, self.b_hh).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return (1 - z) * torch.tanh(i_n + r * h_n) + z * h


class HandLSTM(torch.nn.Module):
    """torch.nn.LSTMCell's equations by hand; a tuple state."""

    def __init__(self, n, D, dtype=F64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(n + D, 4 * D, dtype=dtype)
        self.state_sizes = (D, D)

    def forward(self, x, state):
        h, c = state
        i, f, g, o = self.lin(torch.cat([x, h], -1)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class MLPResidual(torch.nn.Module):
    def __init__(self, n, D, dtype=F64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_size = D
        self.inner = torch.nn.Linear(n + D, 2 * D, dtype=dtype)
        self.outer = torch.nn.Linear(2 * D, D, dtype=dtype)

    def forward(self, x, h):
        return h + 0.1 * torch.tanh(self.outer(torch.tanh(self.inner(torch.cat([x, h], -1)))))


def essay(A):
    """The seed essay's h_t = tanh(A h_{t-1} + u_t), as a plain function closing over A."""
    def cell(u, h):
        return torch.tanh(h @ A.T + u)
    cell.A = A
    return cell


def cast(cell, dtype):
    """The same cell in another dtype."""
    if isinstance(cell, torch.nn.Module):
        return copy.deepcopy(cell).to(dtype)
    return essay(cell.A.to(dtype))


CELLS = ("gru", "lstm", "mlp", "essay")


def make(kind, D, dtype=F64, seed=0):
    if kind == "gru":
        return HandGRU(D, D, dtype, seed)
    if kind == "lstm":
        return HandLSTM(D, D, dtype, seed)
    if kind == "mlp":
        return MLPResidual(D, D, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    return essay((0.8 * torch.randn(D, D, generator=g, dtype=F64) / math.sqrt(D)).to(dtype))


def zero_state(kind, B, D, dtype=F64):
    if kind == "lstm":
        return torch.zeros(B, D, dtype=dtype), torch.zeros(B, D, dtype=dtype)
    return torch.zeros(B, D, dtype=dtype)


def flat(s):
    return torch.cat(s, -1) if isinstance(s, tuple) else s


def loop(cell, x, h0):
    """The reference: the plain loop with autograd, written without paraseq."""
    h, out = h0, []
    for t in range(x.shape[-2]):
        h = cell(x[:, t], h)
        out.append(flat(h))
    return torch.stack(out, dim=1)  # (B, T, D)


def vjp_jacobian(cell, x, h, layout):
    """J (N, D, D) row by row by torch.autograd.functional.jacobian: the reference."""
    rows = []
    for i in range(x.shape[0]):
        def f(hh, i=i):
            return flat(cell(x[i:i + 1], layout.unflatten(hh.unsqueeze(0)))).squeeze(0)
        rows.append(torch.autograd.functional.jacobian(f, h[i]))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", CELLS)
def test_forward_mode_jacobian_equals_autograd(kind):
    D, N = 3, 7
    cell = make(kind, D)
    layout = StateLayout((D, D), True) if kind == "lstm" else StateLayout((D,), False)
    Dt = layout.D
    fc = FlatCell(cell, layout)
    x, h = torch.randn(N, D, dtype=F64), torch.randn(N, Dt, dtype=F64)
    with torch.no_grad():
        got = fc.func_full(x, h)
    assert got is not None and fc.func_ok is True
    F, J = got
    assert F.shape == (N, Dt) and J.shape == (N, Dt, Dt)
    assert torch.allclose(F, fc(x, h), atol=1e-14)
    assert torch.allclose(J, vjp_jacobian(cell, x, h, layout), atol=1e-12)
    with torch.no_grad():  # what the solver calls: the same, and the VJP path agrees too
        assert torch.equal(fc.autograd_full(x, h)[1], J)
    with torch.enable_grad():
        assert torch.allclose(fc.autograd_full(x, h)[1], J, atol=1e-12)


def test_forward_mode_in_row_chunks(monkeypatch):
    monkeypatch.setattr("paraseq.solve.cell.FUNC_CHUNK", 40)  # 40 // (3 * 6): chunks of 2 rows
    cell = make("gru", 3)
    fc = FlatCell(cell, StateLayout((3,), False))
    x, h = torch.randn(9, 3, dtype=F64), torch.randn(9, 3, dtype=F64)
    with torch.no_grad():
        F, J = fc.func_full(x, h)
    assert torch.allclose(F, fc(x, h), atol=1e-14)
    assert torch.allclose(J, vjp_jacobian(cell, x, h, fc.layout), atol=1e-12)


def test_untraceable_cell_takes_the_vjp_path():
    """A cell torch.func cannot vmap (data-dependent Python control flow) still solves."""
    A = 0.5 * torch.eye(2, dtype=F64)

    def cell(x, h):
        if float(h.abs().max()) > 1e6:  # .item()-like: refused under vmap
            return h
        return torch.tanh(h @ A + x)

    x = torch.randn(2, 40, 2, dtype=F64)
    h0 = torch.zeros(2, 2, dtype=F64)
    with torch.no_grad():
        out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        want = loop(cell, x, h0)
    assert info.converged and (out - want).abs().max() <= 1e-8


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(CELLS), B=st.integers(1, 3), T=st.integers(65, 300),
       D=st.integers(1, 5), dtype=st.sampled_from([torch.float64, torch.float32]),
       method=st.sampled_from(["newton", "quasi_newton", "auto"]))
def test_user_cells_match_the_float64_loop(kind, B, T, D, dtype, method):
    cell64 = make(kind, D)
    cell = cast(cell64, dtype)
    x = torch.randn(B, T, D, dtype=F64)
    with torch.no_grad():
        want = loop(cell64, x, zero_state(kind, B, D))
        out, info = paraseq.solve_recurrence(cell, x.to(dtype), zero_state(kind, B, D, dtype),
                                             method=method, return_info=True)
    assert info.converged
    # float32: the solve and the loop round apart, more so where the states grow (the MLP
    # residual cell's reach |h| ~ 10 by T = 300): relative to the states' size
    tol = 1e-8 if dtype == F64 else 1e-3
    assert ((flat(out).to(F64) - want).abs() / (1 + want.abs())).max() <= tol


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_implicit_gradients_exact(kind):
    D, B, T = 3, 2, 97
    cell = make(kind, D)
    x = torch.randn(B, T, D, dtype=F64, requires_grad=True)
    h0 = zero_state(kind, B, D)
    out = flat(paraseq.solve_recurrence(cell, x, h0, method="newton"))
    ref = loop(cell, x, h0)
    assert (out - ref).abs().max() <= 1e-8
    w = torch.randn_like(ref)
    params = [x, *cell.parameters()]
    g1 = torch.autograd.grad((out * w).sum(), params)
    g2 = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_unrolled_keeps_the_graph_through_the_jacobians():
    """grad='unrolled' needs the Jacobians differentiable: the VJP path, not torch.func's."""
    cell = make("gru", 2)
    x = torch.randn(1, 70, 2, dtype=F64, requires_grad=True)
    out = paraseq.solve_recurrence(cell, x, torch.zeros(1, 2, dtype=F64), method="newton",
                                   grad="unrolled", max_iter=6)
    ref = loop(cell, x, torch.zeros(1, 2, dtype=F64))
    (g1,) = torch.autograd.grad(out.sum(), x)
    (g2,) = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g1, g2, atol=1e-9)


def test_speculative_last_iteration_skips_the_jacobian(monkeypatch):
    """Once Newton's residuals predict convergence, f alone is evaluated: one Jacobian fewer
    than evaluations, and the same result."""
    calls = {"jac": 0}
    real = iterate._lin_rhs

    def counting(*a, **k):
        calls["jac"] += 1
        return real(*a, **k)

    monkeypatch.setattr(iterate, "_lin_rhs", counting)
    cell = make("gru", 4)
    x = torch.randn(2, 500, 4, dtype=F64)
    h0 = torch.zeros(2, 4, dtype=F64)
    with torch.no_grad():
        out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        want = loop(cell, x, h0)
    assert info.converged and (out - want).abs().max() <= 1e-8
    assert len(info.residuals) == info.iterations + 1
    # the converged iterate's Jacobian is never formed, and the last step reused the
    # Jacobians one iterate old (a chord step: residuals 1.5e-4 -> 1.3e-8 -> 1.6e-12 here)
    assert calls["jac"] == info.iterations - 1
    assert info.residuals[-1] <= 1e-10


def test_chord_rule():
    newton = METHODS["newton"]
    J = torch.zeros(1, 1, 2, 2)
    # Newton predicts r_k ~ 1.5e-4 ** 3 / 0.035 ** 2 and a chord step r_k^2 / 1.5e-4: tiny
    assert iterate._expect_chord([0.035, 1.5e-4], 1e-10, newton, J) is True
    assert iterate._expect_chord([0.39, 0.035], 1e-10, newton, J) is False
    assert iterate._expect_chord([0.035, 1.5e-4], 1e-10, newton, None) is False  # no J yet
    assert iterate._expect_chord([0.035, 1.5e-4], 1e-10, METHODS["quasi_newton"], J) is False
    assert iterate._expect_chord([0.035, math.nan], 1e-10, newton, J) is False
    assert iterate._chord_converges([1.5e-4], 1.3e-8, 1e-10, J) is True
    assert iterate._chord_converges([1.5e-4], 1e-6, 1e-10, J) is False
    assert iterate._chord_converges([1.5e-4], 2e-4, 1e-10, J) is False  # not decreasing


def test_chord_step_matches_newton_result():
    """A solve that takes a chord step lands on the loop's trajectory as Newton does."""
    cell = make("gru", 6)
    x = torch.randn(3, 300, 6, dtype=F64)
    h0 = torch.randn(3, 6, dtype=F64)
    with torch.no_grad():
        out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        want = loop(cell, x, h0)
    assert info.converged and (out - want).abs().max() <= 1e-9


def test_expect_converged_rule():
    newton = METHODS["newton"]
    assert iterate._expect_converged([0.5, 0.07], 1e-5, newton) is False
    assert iterate._expect_converged([0.07, 3e-4], 1e-5, newton) is True
    assert iterate._expect_converged([3e-4], 1e-5, newton) is False
    assert iterate._expect_converged([0.07, 3e-4], 1e-5, METHODS["quasi_newton"]) is False
    assert iterate._expect_converged([0.07, math.nan], 1e-5, newton) is False


def test_iterations_count_per_time_chunk(monkeypatch):
    """A solve split into time chunks reports the iterations of the chunk that needed most
    (each step went through no more), and every linear solve in ``linear_solves``."""
    cell = make("gru", 4)
    x = torch.randn(2, 600, 4, dtype=F64)
    h0 = torch.zeros(2, 4, dtype=F64)
    with torch.no_grad():
        _, whole = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        monkeypatch.setattr(solve_api, "DENSE_MEMORY_LIMIT", 2 * 4 * 4 * 8 * 4 * 200)
        out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
    assert info.time_chunks == 3 and info.converged
    assert abs(info.iterations - whole.iterations) <= 1
    assert info.linear_solves >= 3 * min(2, info.iterations)
    assert info.linear_solves > info.iterations
    assert whole.linear_solves == whole.iterations
    assert (out - loop(cell, x, h0)).abs().max() <= 1e-8


def test_compile_failure_degrades_to_eager(monkeypatch):
    jit.clear()

    def broken(*a, **k):
        def fn(*args):
            raise RuntimeError("no compiler here")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    cell = make("essay", 3)
    x = torch.randn(2, 80, 3, dtype=F64)
    h0 = torch.zeros(2, 3, dtype=F64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", jacobian="compiled",
                                             return_info=True)
    assert info.converged and info.jacobian == "compiled"
    assert (out - loop(cell, x, h0)).abs().max() <= 1e-8
    msgs = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(msgs) == 2  # once per compiled function (f; f, J and b), then eager silently
    jit.clear()


def test_jacobian_argument_is_checked():
    with pytest.raises(ValueError, match="compiled"):
        paraseq.solve_recurrence(make("essay", 2), torch.randn(1, 5, 2, dtype=F64),
                                 torch.zeros(1, 2, dtype=F64), jacobian="jit")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
def test_compiled_path_matches_the_loop_and_gradients(method, monkeypatch):
    """The real torch.compile (seconds per compilation: one small cell, float64); the
    gradient's adjoint takes the compiled Jacobians too, and the cell alone is timed against
    the eager cell once (``CHOOSE_ROWS``, made small here)."""
    if not jit.available():
        pytest.skip("torch.compile unavailable")
    jit.clear()
    monkeypatch.setattr(jit, "CHOOSE_ROWS", 64)
    cell = make("lstm", 2)
    x = torch.randn(2, 90, 2, dtype=F64, requires_grad=True)
    h0 = zero_state("lstm", 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn
        out, info = paraseq.solve_recurrence(cell, x, h0, method=method, jacobian="compiled",
                                             return_info=True)
        with torch.no_grad():  # another length: the same compiled functions, no recompile
            out2 = paraseq.solve_recurrence(cell, x[:, :71], h0, method=method,
                                            jacobian="compiled")
    assert info.converged and info.jacobian == "compiled"
    assert len(jit.first_call_seconds) == 2
    picks = [v for k, v in jit._CACHE[cell].items() if k[0] == "pick"]
    assert picks and set(picks) <= {"compiled", "eager"}
    ref = loop(cell, x, h0)
    assert (flat(out) - ref).abs().max() <= 1e-8
    assert (flat(out2) - ref[:, :71]).abs().max() <= 1e-8
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((flat(out) * w).sum(), [x, *cell.parameters()])
    g2 = torch.autograd.grad((ref * w).sum(), [x, *cell.parameters()])
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    jit.clear()


def test_auto_probes_a_user_cell(monkeypatch):
    """method='auto' on a user's cell at T >= PROBE_MIN_T times the cell and its Jacobian;
    the margin decides (forced here both ways), and the result is the loop's either way."""
    cell = make("gru", 3)
    x = torch.randn(2, solve_api.PROBE_MIN_T + 37, 3, dtype=F64)
    h0 = torch.zeros(2, 3, dtype=F64)
    want = loop(cell, x, h0).detach()
    picks = {}
    for margin in (0.0, 1e9):
        monkeypatch.setattr(solve_api, "PROBE_MARGIN", margin)
        with torch.no_grad():
            out, info = paraseq.solve_recurrence(cell, x, h0, method="auto", return_info=True)
        picks[margin] = info.method
        assert (out - want).abs().max() <= 1e-8
    assert picks == {0.0: "sequential", 1e9: "newton"}
    monkeypatch.setattr(solve_api, "PROBE_MARGIN", 1e9)
    one = make("essay", 1)
    with torch.no_grad():
        _, info = paraseq.solve_recurrence(one, x[..., :1], h0[:, :1], method="auto",
                                           return_info=True)
    assert info.method == "quasi_newton"
