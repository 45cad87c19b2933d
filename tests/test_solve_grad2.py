"""Second derivatives through ``solve_recurrence`` (issue 12, item 2): gradient penalties,
Hessian-vector products and gradgradcheck for every method and grad mode, generic cells and
paraseq's own cells (compiled kernels included), against autograd through the float64 loop;
and the float32 default's trajectory accuracy on a near-neutral cell (item 8).

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradgradcheck

import paraseq
from paraseq.cells import modules as cells
from paraseq.solve import api as solve_api

F64 = torch.float64
PARALLEL = ["newton", "quasi_newton", "damped_newton", "picard", "jacobi"]
METHODS = ["sequential", *PARALLEL]


class Tanh(torch.nn.Module):
    """h_t = tanh(W h_{t-1} + U x_t), float64."""

    def __init__(self, n=2, D=3, scale=0.6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=F64) * scale / D ** .5)
        self.U = torch.nn.Parameter(torch.randn(D, n, generator=g, dtype=F64))
        self.hidden_size = D

    def forward(self, x, h):
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def loop(cell, x, h0):
    """The float64 reference: autograd through the plain loop (tuple states stacked)."""
    h, out = h0, []
    for t in range(x.shape[-2]):
        h = cell(x[:, t], h)
        out.append(h)
    if isinstance(h, tuple):
        return tuple(torch.stack([o[i] for o in out], dim=1) for i in range(len(h)))
    return torch.stack(out, dim=1)


def flat(states):
    return torch.cat(states, dim=-1) if isinstance(states, tuple) else states


def penalty(H, wrt, of):
    """A gradient penalty: d/d(of) of |d L / d(wrt)|^2, L a nonlinear function of the states."""
    gs = torch.autograd.grad((flat(H).sin() ** 2).sum(), wrt, create_graph=True)
    pen = sum((g ** 2).sum() for g in gs)
    return torch.autograd.grad(pen, of, allow_unused=True, retain_graph=True)


def assert_close(got, want, tol):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.any()
            continue
        assert a is not None
        err = ((a - b).abs() / (1 + b.abs())).max().item()
        assert err < tol, err


def kwargs(method, grad, T):
    kw = dict(method=method, grad=grad)
    if grad == "unrolled":  # T iterations: exact for newton, picard and jacobi
        kw["max_iter"] = T
    return kw


# ------------------------------------------------------------------ gradgradcheck, every mode

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_gradgradcheck_every_method_and_grad_mode(method, grad):
    if method == "sequential" and grad == "unrolled":
        pytest.skip("the loop has no iterations to unroll (grad does not apply)")
    cell = Tanh(n=1, D=2)
    x = torch.randn(2, 3, 1, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    kw = kwargs(method, grad, 3)
    assert gradgradcheck(lambda x, h0, W, U: paraseq.solve_recurrence(cell, x, h0, **kw),
                         (x, h0, cell.W, cell.U))


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "picard"])
def test_gradgradcheck_closure_cell_and_tuple_state(method):
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(2, 2, generator=g, dtype=F64) * 0.4).requires_grad_()
    U = torch.randn(2, 1, generator=g, dtype=F64).requires_grad_()

    def cell(x, h):  # closes over W and U (no module, no attribute)
        return torch.tanh(h @ W.T + x @ U.T)

    x = torch.randn(2, 3, 1, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=F64, requires_grad=True)
    assert gradgradcheck(lambda x, h0, W, U: paraseq.solve_recurrence(cell, x, h0,
                                                                      method=method),
                         (x, h0, W, U))
    lstm = torch.nn.LSTMCell(1, 1).double()
    hc = (torch.randn(2, 1, dtype=F64, requires_grad=True),
          torch.randn(2, 1, dtype=F64, requires_grad=True))
    assert gradgradcheck(lambda x, h, c, w: flat(paraseq.solve_recurrence(
        lstm, x, (h, c), method=method)), (x, *hc, lstm.weight_hh))


@pytest.mark.parametrize("kind", [cells.GRUCell, cells.LSTMCell, cells.ElmanCell])
@pytest.mark.parametrize("method", ["newton", "sequential", "auto"])
def test_gradgradcheck_compiled_kernels(kind, method):
    """paraseq's own cells take the compiled loop or sweeps (once-differentiable kernels); a
    backward that builds a graph replays the solve through the general path."""
    torch.manual_seed(0)
    cell = kind(1, 2).double()
    x = torch.randn(2, 3, 1, dtype=F64, requires_grad=True)
    assert gradgradcheck(lambda x, w: flat(paraseq.solve_recurrence(cell, x, method=method)),
                         (x, cell.weight_hh))
    got = penalty(paraseq.solve_recurrence(cell, x, method=method), list(cell.parameters()),
                  [x, *cell.parameters()])
    h0 = tuple(torch.zeros(2, 2, dtype=F64) for _ in range(2)) if kind is cells.LSTMCell \
        else torch.zeros(2, 2, dtype=F64)
    want = penalty(loop(cell, x, h0), list(cell.parameters()), [x, *cell.parameters()])
    assert_close(got, want, 1e-9)


@pytest.mark.parametrize("kind", [cells.GRUCell, cells.DiagGRUCell, cells.DiagLSTMCell])
@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
def test_second_order_analytic_jacobians_and_time_chunks(kind, method, monkeypatch):
    """The general path on analytic dense, diagonal and block Jacobians, with the adjoint and
    tangent scans split into time chunks (a tiny memory limit)."""
    monkeypatch.setattr(solve_api, "COMPILED_CELLS", False)
    monkeypatch.setattr(solve_api, "DENSE_MEMORY_LIMIT", 2 * 4 * 4 * 8 * 3)
    torch.manual_seed(0)
    cell = kind(2, 2).double()
    x = torch.randn(2, 7, 2, dtype=F64, requires_grad=True)
    h0 = tuple(torch.randn(2, 2, dtype=F64, requires_grad=True) for _ in range(2)) \
        if kind is cells.DiagLSTMCell else torch.randn(2, 2, dtype=F64, requires_grad=True)
    hs = list(h0) if isinstance(h0, tuple) else [h0]
    params = list(cell.parameters())
    got = penalty(paraseq.solve_recurrence(cell, x, h0, method=method), params,
                  [x, *hs, *params])
    want = penalty(loop(cell, x, h0), params, [x, *hs, *params])
    assert_close(got, want, 1e-9)


# ------------------------------------------------------ penalties and HVPs against the loop

def test_gradient_penalty_and_hvp_match_the_loop_under_auto():
    """T = 70 > 64: auto takes a parallel method (newton here); the gradient penalty on the
    inputs and a Hessian-vector product in the parameters equal autograd's through the loop."""
    cell = Tanh(D=2)
    x = torch.randn(1, 70, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, dtype=F64, requires_grad=True)
    H, info = paraseq.solve_recurrence(cell, x, h0, return_info=True)
    assert info.method == "newton"
    params = [cell.W, cell.U]
    of = [x, h0, *params]
    assert_close(penalty(H, [x], of), penalty(loop(cell, x, h0), [x], of), 1e-8)

    v = [torch.randn_like(p) for p in params]

    def hvp(H):
        gs = torch.autograd.grad((flat(H) ** 3).sum(), params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(gs, v, strict=True))
        return torch.autograd.grad(dot, params)

    H = paraseq.solve_recurrence(cell, x, h0)
    assert_close(hvp(H), hvp(loop(cell, x, h0)), 1e-8)


def test_maml_inner_step_matches_the_loop():
    """One inner SGD step on the parameters (create_graph), then the outer gradient with
    respect to the initial parameters: the second derivative MAML needs."""
    x = torch.randn(2, 9, 2, dtype=F64)
    target = torch.randn(2, 9, 3, dtype=F64)

    def outer(solve):
        cell = Tanh()
        W0, U0 = cell.W, cell.U

        def step(W, U):
            return lambda xt, h: torch.tanh(h @ W.T + xt @ U.T)

        inner = ((solve(step(W0, U0), x) - target) ** 2).mean()
        gW, gU = torch.autograd.grad(inner, [W0, U0], create_graph=True)
        W1, U1 = W0 - 0.5 * gW, U0 - 0.5 * gU
        loss = ((solve(step(W1, U1), x) - target) ** 2).mean()
        return torch.autograd.grad(loss, [W0, U0])

    h0 = torch.zeros(2, 3, dtype=F64)
    want = outer(lambda c, x: loop(c, x, h0))
    for method in PARALLEL:
        got = outer(lambda c, x, m=method: paraseq.solve_recurrence(c, x, h0, method=m))
        assert_close(got, want, 1e-8)


def test_a_tensor_found_only_through_the_graph_gets_its_second_derivative():
    """A parameter held where ``_held_tensors`` does not look (an attribute of a plain
    object, in a dict) is found by walking the cell's graph."""
    W = (torch.randn(3, 3, dtype=F64) * 0.4).requires_grad_()
    U = torch.randn(3, 2, dtype=F64).requires_grad_()

    class Holder:
        def __init__(self):
            self.p = {"W": W, "U": U}

        def __call__(self, x, h):
            return torch.tanh(h @ self.p["W"].T + x @ self.p["U"].T)

    x = torch.randn(2, 6, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64)
    got = penalty(paraseq.solve_recurrence(Holder(), x, h0, method="newton"), [W], [W, U, x])
    want = penalty(loop(Holder(), x, h0), [W], [W, U, x])
    assert_close(got, want, 1e-9)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(PARALLEL), T=st.integers(1, 13), B=st.integers(1, 3),
       D=st.integers(1, 3), grad=st.sampled_from(["implicit", "unrolled"]),
       seed=st.integers(0, 2 ** 16))
def test_penalty_matches_the_loop_property(method, T, B, D, grad, seed):
    g = torch.Generator().manual_seed(seed)
    cell = Tanh(D=D, seed=seed)
    x = torch.randn(B, T, 2, generator=g, dtype=F64, requires_grad=True)
    h0 = torch.randn(B, D, generator=g, dtype=F64, requires_grad=True)
    kw = kwargs(method, grad, T)
    if grad == "unrolled" and method in ("quasi_newton", "damped_newton"):
        kw["max_iter"] = 2 * T + 6  # inexact linearisations: more iterations to be exact
    of = [x, h0, cell.W, cell.U]
    got = penalty(paraseq.solve_recurrence(cell, x, h0, **kw), [cell.W, x], of)
    want = penalty(loop(cell, x, h0), [cell.W, x], of)
    assert_close(got, want, 1e-7)


# ------------------------------------------------- float32 trajectory accuracy (item 8)

class NearNeutral(torch.nn.Module):
    """h + 0.1 tanh(MLP(x, h)): the Jacobian is close to I, so residuals add up."""

    def __init__(self, n=3, D=6):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(n + D, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, D))
        self.hidden_size = D

    def forward(self, x, h):
        return h + 0.1 * torch.tanh(self.mlp(torch.cat([x, h], dim=-1)))


@pytest.mark.parametrize("method", ["picard", "quasi_newton", "newton"])
def test_float32_default_is_within_10x_the_loops_own_error(method):
    torch.manual_seed(0)
    cell = NearNeutral()
    x = torch.randn(2, 400, 3)
    h0 = torch.zeros(2, 6)
    with torch.no_grad():
        exact = loop(cell.double(), x.double(), h0.double())
        cell.float()
        scale = exact.abs().max()
        loop_err = ((loop(cell, x, h0).double() - exact).abs().max() / scale).item()
        H = paraseq.solve_recurrence(cell, x, h0, method=method)
        err = ((H.double() - exact).abs().max() / scale).item()
        # without the polish (a tol given explicitly means exactly that per-step residual)
        H_tol = paraseq.solve_recurrence(cell, x, h0, method=method, tol=1e-5)
        err_tol = ((H_tol.double() - exact).abs().max() / scale).item()
    assert err <= 10 * loop_err, (err, loop_err)
    assert err_tol > 10 * loop_err  # what the polish removes (measured 20x to 700x)
