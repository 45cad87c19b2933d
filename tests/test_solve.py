"""paraseq.solve_recurrence: every method against the sequential loop, gradients against
autograd through the loop, the failure policies, and bad input.

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import paraseq
from paraseq.solve import METHODS
from paraseq.solve import api as solve_api

PARALLEL = ["newton", "quasi_newton", "damped_newton", "picard", "jacobi"]
ALL = ["sequential", *PARALLEL, "auto"]
F64 = torch.float64


def loop(cell, x, h0):
    """The reference: the plain loop with autograd, written without paraseq."""
    h, out = h0, []
    for t in range(x.shape[-2]):
        h = cell(x[..., t, :].reshape(-1, x.shape[-1]), h)
        out.append(h)
    if isinstance(h0, tuple):
        return tuple(torch.stack([o[i] for o in out], dim=-2) for i in range(len(h0)))
    return torch.stack(out, dim=-2)


class EssayRNN(torch.nn.Module):
    """x_t = tanh(A x_{t-1} + u_t), the essay's example, as a user nn.Module."""

    def __init__(self, D, scale, seed=0, zero_diag=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(D, D, generator=g, dtype=F64) * scale / math.sqrt(D)
        if zero_diag:
            A.fill_diagonal_(0.0)
        self.A = torch.nn.Parameter(A)

    def forward(self, u, h):
        return torch.tanh(h @ self.A.T + u)


def residual(cell, x, h0, H):
    """max_t |h_t - f(x_t, h_{t-1})| / (1 + |f|) for a (B, T, D) trajectory."""
    Hp = torch.cat([h0.unsqueeze(1), H[:, :-1]], dim=1)
    B, T, D = H.shape
    F = cell(x.reshape(B * T, -1), Hp.reshape(B * T, D)).reshape(B, T, D)
    return ((H - F).abs() / (1 + F.abs())).max().item()


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("T", [1, 2, 17, 1000])
def test_essay_rnn_contracting(method, T):
    cell = EssayRNN(6, 0.5)
    x = torch.randn(3, T, 6, dtype=F64)
    h0 = torch.randn(3, 6, dtype=F64)
    with torch.no_grad():
        want = loop(cell, x, h0)
        got, info = paraseq.solve_recurrence(cell, x, h0, method=method, return_info=True)
    assert info.converged
    assert (got - want).abs().max().item() <= 1e-9
    if method in ("newton", "damped_newton") and T == 1000:
        assert info.iterations <= 8 and not info.fell_back  # quadratic convergence


@pytest.mark.parametrize("method", PARALLEL)
def test_long_sequence(method):
    # T = 10000 in float32, a contracting GRU: every method ends within tolerance of the loop
    torch.manual_seed(0)
    cell = torch.nn.GRUCell(3, 4)
    x = torch.randn(2, 10_000, 3)
    with torch.no_grad():
        want = loop(cell, x, torch.zeros(2, 4))
        got, info = paraseq.solve_recurrence(cell, x, method=method, return_info=True)
    assert info.converged and info.residual <= 1e-5
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_torch_cells(method, kind):
    torch.manual_seed(1)
    n, D = 5, 7
    cell = {"rnn_tanh": lambda: torch.nn.RNNCell(n, D),
            "rnn_relu": lambda: torch.nn.RNNCell(n, D, nonlinearity="relu"),
            "gru": lambda: torch.nn.GRUCell(n, D),
            "lstm": lambda: torch.nn.LSTMCell(n, D)}[kind]().double()
    x = torch.randn(2, 3, 150, n, dtype=F64)  # two batch dims
    if kind == "lstm":
        h0 = (torch.randn(2, 3, D, dtype=F64), torch.randn(2, 3, D, dtype=F64))
    else:
        h0 = torch.randn(2, 3, D, dtype=F64)
    with torch.no_grad():
        flat0 = tuple(h.reshape(6, D) for h in h0) if kind == "lstm" else h0.reshape(6, D)
        want = loop(cell, x.reshape(6, 150, n), flat0)
        got = paraseq.solve_recurrence(cell, x, h0, method=method)
    if kind == "lstm":
        assert isinstance(got, tuple) and len(got) == 2
        for g, w in zip(got, want, strict=True):
            assert g.shape == (2, 3, 150, D)
            assert (g.reshape(6, 150, D) - w).abs().max().item() <= 1e-9
    else:
        assert got.shape == (2, 3, 150, D)
        assert (got.reshape(6, 150, D) - want).abs().max().item() <= 1e-9


def test_default_zero_state_from_the_cell():
    cell = torch.nn.LSTMCell(3, 4).double()
    x = torch.randn(5, 40, 3, dtype=F64)
    h, c = paraseq.solve_recurrence(cell, x, method="newton")
    with torch.no_grad():
        wh, wc = loop(cell, x, (torch.zeros(5, 4, dtype=F64), torch.zeros(5, 4, dtype=F64)))
    assert torch.allclose(h, wh, atol=1e-9) and torch.allclose(c, wc, atol=1e-9)


@pytest.mark.parametrize("method", ALL)
def test_closure_cell(method):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 4, generator=g, dtype=F64) * 0.3
    U = torch.randn(2, 4, generator=g, dtype=F64)

    def cell(x, h):  # a plain function closing over tensors
        return torch.sin(h @ W + x @ U)

    x = torch.randn(3, 200, 2, dtype=F64)
    h0 = torch.zeros(3, 4, dtype=F64)
    with torch.no_grad():
        got = paraseq.solve_recurrence(cell, x, h0, method=method)
        assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-9


@pytest.mark.parametrize("method", PARALLEL)
def test_strongly_coupled(method):
    # ||A|| around 3: tanh saturates, Newton needs more iterations, the plain ones stall;
    # the result must still be the loop's (through the fallback where needed)
    cell = EssayRNN(8, 3.0, seed=3)
    x = torch.randn(2, 500, 8, dtype=F64)
    h0 = torch.zeros(2, 8, dtype=F64)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, h0, method=method, return_info=True)
        assert info.converged
        assert residual(cell, x, h0, got) <= 1e-10
        assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-8


@pytest.mark.parametrize("method", ["quasi_newton", "picard"])
def test_zero_jacobian_diagonal_needs_the_fallback(method):
    # a contracting cell whose Jacobian has a zero diagonal: the diagonal linearisation is
    # Jacobi in disguise and picard's A = I is wrong; they stall, the fallback finishes
    cell = EssayRNN(6, 0.9, seed=4, zero_diag=True)
    x = torch.randn(2, 3000, 6, dtype=F64)
    h0 = torch.zeros(2, 6, dtype=F64)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, h0, method=method, max_iter=20,
                                             return_info=True)
        assert info.fell_back and info.converged
        assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-9


@pytest.mark.parametrize("method", PARALLEL)
def test_chaotic_cell_stays_correct(method):
    # largest Lyapunov exponent > 0: errors grow exponentially along the sequence; whatever
    # the parallel method manages, the returned trajectory satisfies the recurrence
    g = torch.Generator().manual_seed(5)
    A = torch.randn(8, 8, generator=g, dtype=F64) * 2.5 / math.sqrt(8)

    def cell(x, h):
        return torch.tanh(h @ A.T + x)

    x = 0.1 * torch.randn(1, 2000, 8, dtype=F64)
    h0 = torch.randn(1, 8, dtype=F64)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, h0, method=method, return_info=True)
    assert info.converged
    assert residual(cell, x, h0, got) <= 1e-10


def test_damped_newton_converges_where_newton_does_not():
    # h_t = h_{t-1} - 0.1 h_{t-1}^3 + x_t from a zero guess: Newton's linearisation at h = 0
    # misses the cubic term entirely, its full steps overshoot into the region where the cubic
    # explodes, and it never recovers; Levenberg-Marquardt steps lower the residual every time
    def cell(x, h):
        return h - 0.1 * h**3 + x

    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(1, 1000, 2, dtype=F64, generator=g)
    h0 = torch.zeros(1, 2, dtype=F64)
    init = torch.zeros(1, 1000, 2, dtype=F64)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="did not converge"):
            _, plain = paraseq.solve_recurrence(cell, x, h0, method="newton", init=init,
                                                max_iter=60, on_failure="warn",
                                                return_info=True)
        got, damped = paraseq.solve_recurrence(cell, x, h0, method="damped_newton", init=init,
                                               max_iter=60, on_failure="raise",
                                               return_info=True)
    assert not plain.converged and plain.residual > 1e3  # diverged
    assert damped.converged and damped.iterations <= 15
    assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-9


# ----------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.one_of(st.sampled_from([1, 2, 17]), st.integers(1, 200)),
    D=st.integers(1, 6),
    n=st.integers(1, 4),
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    method=st.sampled_from(ALL),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    scale=st.floats(0.1, 1.5),
    seed=st.integers(0, 2**16),
)
def test_property_matches_loop(T, D, n, batch, method, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, D, generator=g, dtype=F64) * scale / math.sqrt(D)).to(dtype)
    U = torch.randn(n, D, generator=g, dtype=F64).to(dtype)

    def cell(x, h):
        return torch.tanh(h @ W + x @ U)

    x = torch.randn(*batch, T, n, generator=g, dtype=F64).to(dtype)
    h0 = torch.randn(*batch, D, generator=g, dtype=F64).to(dtype)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, h0, method=method, return_info=True)
        B = math.prod(batch)
        want = loop(cell, x.reshape(B, T, n), h0.reshape(B, D)).reshape(*batch, T, D)
    assert got.shape == (*batch, T, D) and got.dtype == dtype
    assert info.converged
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert (got - want).abs().max().item() <= tol


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_implicit_gradients_equal_autograd_through_the_loop(method, dtype):
    torch.manual_seed(3)
    cell = torch.nn.GRUCell(3, 5).to(dtype)
    x = torch.randn(2, 300, 3, dtype=dtype, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 300, 5, dtype=dtype)
    params = [*cell.parameters()]
    got = torch.autograd.grad((paraseq.solve_recurrence(cell, x, h0, method=method) * w).sum(),
                              [x, h0, *params])
    want = torch.autograd.grad((loop(cell, x, h0) * w).sum(), [x, h0, *params])
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def test_implicit_gradients_lstm_and_closure():
    # tuple states; a closed-over tensor that requires grad (not a module parameter)
    torch.manual_seed(4)
    lstm = torch.nn.LSTMCell(2, 3).double()
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def cell(x, hc):
        h, c = lstm(x * scale, hc)
        return h, c

    x = torch.randn(2, 120, 2, dtype=F64)
    hc0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
    wh, wc = torch.randn(2, 120, 3, dtype=F64), torch.randn(2, 120, 3, dtype=F64)
    got_h, got_c = paraseq.solve_recurrence(cell, x, hc0, method="quasi_newton")
    ref_h, ref_c = loop(cell, x, hc0)
    params = [scale, *lstm.parameters()]
    g1 = torch.autograd.grad((got_h * wh).sum() + (got_c * wc).sum(), params)
    g2 = torch.autograd.grad((ref_h * wh).sum() + (ref_c * wc).sum(), params)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "damped_newton", "picard",
                                    "jacobi"])
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_gradcheck(method, grad):
    g = torch.Generator().manual_seed(6)
    W = (torch.randn(3, 3, generator=g, dtype=F64) * 0.4).requires_grad_()

    def run(x, h0, W):
        return paraseq.solve_recurrence(lambda u, h: torch.tanh(h @ W + u), x, h0,
                                        method=method, grad=grad, max_iter=12 if
                                        grad == "unrolled" else None, tol=1e-12)

    x = torch.randn(2, 12, 3, dtype=F64, generator=g, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, generator=g, requires_grad=True)
    assert gradcheck(run, (x, h0, W))


def test_unrolled_differentiates_the_iterations_not_the_solution():
    # with too few iterations to converge, the unrolled gradient is that of the iterate
    # (checked by finite differences above) and differs from the implicit one
    cell = EssayRNN(4, 0.9, seed=8)
    x = torch.randn(1, 50, 4, dtype=F64, requires_grad=True)
    h0 = torch.zeros(1, 4, dtype=F64)
    out_u, info = paraseq.solve_recurrence(cell, x, h0, method="jacobi", grad="unrolled",
                                           max_iter=3, return_info=True)
    assert info.iterations == 3 and not info.converged
    gu = torch.autograd.grad(out_u.sum(), x)[0]
    gi = torch.autograd.grad(paraseq.solve_recurrence(cell, x, h0, method="jacobi").sum(), x)[0]
    assert not torch.allclose(gu, gi)


# ----------------------------------------------------------------------------- policies

def test_on_failure_raise_and_warn():
    cell = EssayRNN(6, 0.9, seed=4, zero_diag=True)
    x = torch.randn(2, 500, 6, dtype=F64)
    h0 = torch.zeros(2, 6, dtype=F64)
    with pytest.raises(paraseq.ConvergenceError) as err:
        paraseq.solve_recurrence(cell, x, h0, method="picard", max_iter=3, on_failure="raise")
    assert err.value.iterations == 3 and err.value.residual > 1e-10
    with pytest.warns(RuntimeWarning, match="did not converge"):
        out, info = paraseq.solve_recurrence(cell, x, h0, method="picard", max_iter=3,
                                             on_failure="warn", return_info=True)
    assert not info.converged and info.residual > info.tol and not info.fell_back
    assert out.shape == (2, 500, 6)


def test_info_fields_and_warm_start():
    cell = EssayRNN(5, 0.5, seed=9)
    x = torch.randn(2, 300, 5, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)
    with torch.no_grad():
        sol, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        assert info.method == "newton" and info.jacobian == "autograd"
        assert info.converged and not info.fell_back and info.fallback_from is None
        assert len(info.residuals) == info.iterations + 1
        assert info.residuals[-1] <= info.tol == 1e-10
        # warm start from the solution: accepted before any iteration
        _, again = paraseq.solve_recurrence(cell, x, h0, method="newton", init=sol,
                                            return_info=True)
        assert again.iterations == 0 and again.converged


def test_nan_mid_iteration_is_contained():
    # log(1 + h^2) is finite on the true trajectory, but a wild initial guess overflows;
    # the iterates are cleaned, and the result equals the loop's
    def cell(x, h):
        return 0.5 * torch.tanh(h) + 0.1 * torch.log1p(h * h) + x

    x = 0.1 * torch.randn(1, 200, 3, dtype=F64)
    h0 = torch.zeros(1, 3, dtype=F64)
    init = torch.full((1, 200, 3), 1e300, dtype=F64)
    init[0, 50] = float("nan")
    with torch.no_grad():
        for method in PARALLEL:
            got, info = paraseq.solve_recurrence(cell, x, h0, method=method, init=init,
                                                 return_info=True)
            assert torch.isfinite(got).all() and info.converged
            assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-9


def test_nan_from_the_cell_itself_is_returned():
    # the loop produces nan from step 10 on: so does the solver, and it does not hang
    def cell(x, h):
        return torch.sqrt(h + x)

    x = torch.ones(1, 30, 1, dtype=F64)
    x[0, 9] = -100.0
    h0 = torch.zeros(1, 1, dtype=F64)
    with torch.no_grad():
        want = loop(cell, x, h0)
        got = paraseq.solve_recurrence(cell, x, h0, method="newton")
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_time_chunks_under_a_memory_limit(monkeypatch):
    cell = EssayRNN(4, 0.6, seed=10)
    x = torch.randn(2, 1000, 4, dtype=F64, requires_grad=True)
    h0 = torch.zeros(2, 4, dtype=F64)
    monkeypatch.setattr(solve_api, "DENSE_MEMORY_LIMIT", 2 * 4 * 4 * 8 * 4 * 150)
    out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
    assert info.time_chunks == 7 and info.converged
    ref = loop(cell, x, h0)
    assert (out - ref).abs().max().item() <= 1e-10
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out * w).sum(), [x, cell.A])
    g2 = torch.autograd.grad((ref * w).sum(), [x, cell.A])
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_hutchinson_diagonal():
    cell = EssayRNN(5, 0.4, seed=12)
    x = torch.randn(2, 300, 5, dtype=F64)
    h0 = torch.zeros(2, 5, dtype=F64)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, h0, method="quasi_newton",
                                             jacobian="hutchinson", hutchinson_samples=16,
                                             generator=torch.Generator().manual_seed(0),
                                             return_info=True)
    assert info.jacobian == "hutchinson" and info.converged
    assert (got - loop(cell, x, h0)).abs().max().item() <= 1e-9


def test_low_precision_inputs():
    torch.manual_seed(5)
    cell = torch.nn.GRUCell(3, 4).to(torch.bfloat16)
    x = torch.randn(2, 200, 3).to(torch.bfloat16)
    with torch.no_grad():
        got, info = paraseq.solve_recurrence(cell, x, method="newton", return_info=True)
        want = loop(cell, x, torch.zeros(2, 4, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and info.converged
    assert (got.float() - want.float()).abs().max().item() <= 0.05


def test_auto_rule():
    def method(cell, B, T, D):
        x = torch.randn(B, T, D, dtype=F64)
        _, info = paraseq.solve_recurrence(cell, x, torch.zeros(B, D, dtype=F64),
                                           return_info=True)
        return info.method

    small, big = EssayRNN(4, 0.5), EssayRNN(64, 0.5)
    assert method(small, 1, 40, 4) == "sequential"  # short
    assert method(small, 1, 400, 4) == "newton"  # B D^2 = 16, training (A requires grad)
    with torch.no_grad():
        assert method(small, 32, 400, 4) == "sequential"  # B D^2 = 512 on a CPU
    assert method(small, 32, 400, 4) == "newton"  # ... but a backward pass will follow
    assert method(big, 1, 400, 64) == "sequential"  # 4096 > 8 * 256

    class DiagOnly(EssayRNN):
        def forward_with_jacobian_diagonal(self, u, h):
            out = self(u, h)
            return out, (1 - out**2) * torch.diagonal(self.A)

    assert method(DiagOnly(4, 0.5), 8, 400, 4) == "quasi_newton"
    cuda = torch.device("cuda")
    fc = paraseq.solve.cell.FlatCell(big, paraseq.solve.cell.StateLayout((40,), False))
    assert paraseq.solve.api.choose_method(1000, 64, 40, fc, cuda) == "newton"
    fc = paraseq.solve.cell.FlatCell(EssayRNN(80, 0.5),
                                     paraseq.solve.cell.StateLayout((80,), False))
    assert paraseq.solve.api.choose_method(1000, 64, 80, fc, cuda) == "quasi_newton"


def test_analytic_protocol_is_used_and_checked():
    class Analytic(EssayRNN):
        calls = 0

        def forward_with_jacobian(self, u, h):
            Analytic.calls += 1
            out = self(u, h)
            return out, (1 - out**2).unsqueeze(-1) * self.A

    cell = Analytic(5, 0.5, seed=13)
    x = torch.randn(2, 300, 5, dtype=F64, requires_grad=True)
    h0 = torch.zeros(2, 5, dtype=F64)
    out, info = paraseq.solve_recurrence(cell, x, h0, method="newton", jacobian="analytic",
                                         return_info=True)
    # every Jacobian formed is the protocol's (a last chord step may reuse the one before)
    assert info.jacobian == "analytic" and Analytic.calls >= info.iterations - 1
    ref = loop(cell, x, h0)
    assert (out - ref).abs().max().item() <= 1e-10
    w = torch.randn_like(ref)
    calls = Analytic.calls
    g1 = torch.autograd.grad((out * w).sum(), [x, cell.A])
    assert Analytic.calls > calls  # the adjoint used the analytic Jacobian too
    g2 = torch.autograd.grad((ref * w).sum(), [x, cell.A])
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- bad input

def test_bad_input():
    cell = torch.nn.GRUCell(3, 4)
    x = torch.randn(2, 10, 3)
    h0 = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="cell must be callable"):
        paraseq.solve_recurrence("gru", x, h0)
    with pytest.raises(TypeError, match=r"inputs must be a torch.Tensor .* got list"):
        paraseq.solve_recurrence(cell, [[1.0]], h0)
    with pytest.raises(ValueError, match=r"inputs must have shape \(\.\.\., T, n\) .* got "
                                         r"shape \(3,\)"):
        paraseq.solve_recurrence(cell, torch.randn(3), h0)
    with pytest.raises(ValueError, match=r"h0 has batch dims \(5,\), which do not broadcast"):
        paraseq.solve_recurrence(cell, x, torch.zeros(5, 4), method="newton")
    with pytest.raises(ValueError, match=r"h0 must be a tensor of shape \(\.\.\., 4\) for "
                                         r"GRUCell; got a tensor with feature size 5"):
        paraseq.solve_recurrence(cell, x, torch.zeros(2, 5), method="newton")
    with pytest.raises(ValueError, match=r"h0 must be a tuple with feature sizes \(4, 4\)"):
        paraseq.solve_recurrence(torch.nn.LSTMCell(3, 4), x, h0)
    with pytest.raises(ValueError, match=r"cell\(x, h\) must return the state's structure, a "
                                         r"tensor of shape \(20, 4\); got a tensor of shape "
                                         r"\(20, 8\)"):
        paraseq.solve_recurrence(lambda u, h: torch.cat([h, h], -1), x, h0, method="newton")
    with pytest.raises(ValueError, match=r"a tuple of 2 tensors"):
        paraseq.solve_recurrence(lambda u, h: h[0], x, (h0, h0), method="sequential")
    with pytest.raises(ValueError, match=r"unknown method 'newtonn'; valid: 'auto', "
                                         r"'sequential', 'newton'"):
        paraseq.solve_recurrence(cell, x, h0, method="newtonn")
    with pytest.raises(ValueError, match=r"tol must be a positive finite number; got 0"):
        paraseq.solve_recurrence(cell, x, h0, tol=0)
    with pytest.raises(ValueError, match=r"max_iter must be an int >= 1; got 0"):
        paraseq.solve_recurrence(cell, x, h0, max_iter=0)
    with pytest.raises(ValueError, match=r"on_failure must be one of"):
        paraseq.solve_recurrence(cell, x, h0, on_failure="ignore")
    with pytest.raises(ValueError, match=r"grad must be 'implicit' or 'unrolled'"):
        paraseq.solve_recurrence(cell, x, h0, grad="exact")
    with pytest.raises(ValueError, match=r"unknown jacobian 'fd'"):
        paraseq.solve_recurrence(cell, x, h0, jacobian="fd")
    with pytest.raises(ValueError, match=r"jacobian='hutchinson' estimates a diagonal"):
        paraseq.solve_recurrence(cell, x, h0, method="newton", jacobian="hutchinson")
    with pytest.raises(ValueError, match=r"jacobian='analytic' needs a cell that defines"):
        paraseq.solve_recurrence(cell, x, h0, method="newton", jacobian="analytic")
    with pytest.raises(ValueError, match=r"h0=None needs a cell with a 'hidden_size'"):
        paraseq.solve_recurrence(lambda u, h: h, x)
    with pytest.raises(ValueError, match=r"init must have shape \(\.\.\., T, D\) with T = 10"):
        paraseq.solve_recurrence(cell, x, h0, method="newton", init=torch.zeros(2, 9, 4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'tolerance'"):
        paraseq.solve_recurrence(cell, x, h0, tolerance=1e-3)
    with pytest.raises(TypeError, match=r"returned dtype torch.float32 for a state of dtype "
                                        r"torch.float64"):
        paraseq.solve_recurrence(lambda u, h: torch.tanh(h).float(), x.double(), h0.double(),
                                 method="newton")
    assert set(METHODS) == {"sequential", "newton", "quasi_newton", "damped_newton", "picard",
                            "jacobi"}


def test_cells_declaring_a_diagonal_jacobian_get_quasi_newton_and_a_diagonal_adjoint(
        monkeypatch):
    from paraseq.cells import DiagGRUCell
    from paraseq.solve import api

    monkeypatch.setattr(api, "COMPILED_CELLS", False)  # the general loop, not the kernels

    torch.manual_seed(0)
    cell = DiagGRUCell(3, 5).double()
    assert cell.jacobian_is_diagonal
    x = torch.randn(2, 200, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    H, info = paraseq.solve_recurrence(cell, x, h0, return_info=True)
    assert info.method == "quasi_newton" and info.converged and info.iterations <= 8
    Hs = paraseq.solve_recurrence(cell, x, h0, method="sequential")
    assert torch.allclose(H, Hs, atol=1e-10)
    w = torch.randn_like(H)
    params = [x, h0, *cell.parameters()]
    g = torch.autograd.grad((w * H).sum(), params)
    gs = torch.autograd.grad((w * Hs).sum(), params)
    for a, b in zip(g, gs, strict=True):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("method", ["auto", "newton", "damped_newton"])
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_block_diagonal_jacobians_solve_and_differentiate_exactly(method, grad, monkeypatch):
    from paraseq.cells import DiagLSTMCell
    from paraseq.solve import api

    monkeypatch.setattr(api, "COMPILED_CELLS", False)  # the general loop, not the kernels

    torch.manual_seed(1)
    cell = DiagLSTMCell(3, 4).double()
    x = torch.randn(2, 150, 3, dtype=torch.float64, requires_grad=True)
    h0 = tuple(torch.randn(2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kw = {"max_iter": 6} if grad == "unrolled" else {}
    (H, C), info = paraseq.solve_recurrence(cell, x, h0, method=method, grad=grad,
                                            return_info=True, **kw)
    assert info.method == ("newton" if method == "auto" else method)
    if grad == "implicit":
        assert info.converged and not info.fell_back and info.iterations <= 6
    Hs, Cs = paraseq.solve_recurrence(cell, x, h0, method="sequential")
    assert torch.allclose(H, Hs, atol=1e-10) and torch.allclose(C, Cs, atol=1e-10)
    wh, wc = torch.randn_like(H), torch.randn_like(C)
    params = [x, *h0, *cell.parameters()]
    g = torch.autograd.grad((wh * H).sum() + (wc * C).sum(), params)
    gs = torch.autograd.grad((wh * Hs).sum() + (wc * Cs).sum(), params)
    for a, b in zip(g, gs, strict=True):
        assert torch.allclose(a, b, atol=1e-8)


def test_blocks_to_dense_places_each_block_on_its_entries():
    from paraseq.solve.cell import blocks_to_dense

    Jb = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    J = blocks_to_dense(Jb)  # (5, 6, 6)
    want = torch.zeros(5, 6, 6, dtype=torch.float64)
    for g in range(3):
        for s in range(2):
            for r in range(2):
                want[:, s * 3 + g, r * 3 + g] = Jb[:, g, s, r]
    assert torch.equal(J, want)


# ----------------------------------------------------------------------------- paraseq's cells


@pytest.mark.parametrize("kind", ["elman_tanh", "elman_relu", "gru", "lstm", "diag_gru",
                                  "diag_lstm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paraseqs_own_cells_take_the_compiled_kernels(kind, dtype):
    """paraseq.cells' cells on CPU: "sequential" and "auto" run the compiled loop, "newton"
    (dense cells) the compiled sweeps; every route gives the general loop's states and
    gradients, with leading batch dims, h0 and bias=False."""
    from paraseq.cells import DiagGRUCell, DiagLSTMCell, ElmanCell, GRUCell, LSTMCell, compiled
    from paraseq.solve import api

    if not compiled.AVAILABLE:
        pytest.skip("numba is not installed")
    make = {"elman_tanh": lambda: ElmanCell(3, 5), "elman_relu": lambda: ElmanCell(
        3, 5, nonlinearity="relu"), "gru": lambda: GRUCell(3, 5),
        "lstm": lambda: LSTMCell(3, 5, bias=False), "diag_gru": lambda: DiagGRUCell(3, 5),
        "diag_lstm": lambda: DiagLSTMCell(3, 5)}[kind]
    torch.manual_seed(2)
    cell = make().to(dtype)
    x = torch.randn(2, 3, 120, 3, dtype=dtype, requires_grad=True)
    lstm = kind.endswith("lstm")
    h0 = 0.3 * torch.randn(2, 3, 5, dtype=dtype)
    h0 = (h0, 0.3 * torch.randn(2, 3, 5, dtype=dtype)) if lstm else h0

    def flat(out):
        return torch.cat(out, -1) if lstm else out

    ref = flat(paraseq.solve_recurrence(lambda a, b: cell(a, b), x, h0, method="sequential"))
    w = torch.randn_like(ref)
    params = [x, *cell.parameters()]
    gref = torch.autograd.grad((w * ref).sum(), params)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for method in ("auto", "sequential", "newton"):
        out, info = paraseq.solve_recurrence(cell, x, h0, method=method, tol=tol,
                                             return_info=True)
        swept = method == "newton" and not kind.startswith("diag")
        assert info.method == ("newton" if method == "newton" else "sequential")
        assert (info.jacobian == "analytic (compiled sweep)") == swept
        assert info.converged and not info.fell_back
        err = float((flat(out) - ref).detach().abs().max())
        assert err <= (1e-9 if dtype == torch.float64 else 2e-5), (method, err)
        g = torch.autograd.grad((w * flat(out)).sum(), params)
        for a, b in zip(g, gref, strict=True):
            assert float((a - b).abs().max()) <= (1e-8 if dtype == torch.float64 else 1e-3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "COMPILED_CELLS", False)
        _, info = paraseq.solve_recurrence(cell, x, h0, method="newton", return_info=True)
        assert info.jacobian in ("analytic", "autograd")


def test_compiled_route_leaves_other_cases_to_the_general_loop():
    """A subclass (it may change forward), grad="unrolled", an init, autograd Jacobians and
    other methods keep the general loop."""
    from paraseq.cells import GRUCell

    class MyGRU(GRUCell):
        pass

    torch.manual_seed(3)
    x = torch.randn(2, 50, 3, dtype=torch.float64)
    cell = GRUCell(3, 4).double()
    sub = MyGRU(3, 4).double()
    sub.load_state_dict(cell.state_dict())
    for c, kw in ((sub, {"method": "newton"}), (cell, {"method": "newton", "grad": "unrolled"}),
                  (cell, {"method": "newton", "jacobian": "autograd"}),
                  (cell, {"method": "quasi_newton"}),
                  (cell, {"method": "newton", "init": torch.zeros(2, 50, 4,
                                                                   dtype=torch.float64)})):
        _, info = paraseq.solve_recurrence(c, x, return_info=True, **kw)
        assert info.jacobian != "analytic (compiled sweep)", kw
        assert info.method == kw["method"]
