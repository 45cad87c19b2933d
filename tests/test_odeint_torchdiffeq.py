"""The same calls through torchdiffeq and paraseq: the drop-in is judged against the original.

Fixed-grid explicit methods must agree to rounding (the same method on the same grid, step_size
grids and their interpolation included); adaptive methods must both be within their tolerance
of the exact solution; gradients on a fixed grid agree to rounding, adjoint gradients and event
times to the tolerance; tuple and 0-d states and float64 t with float32 y0 are accepted alike.
The cases follow torchdiffeq's own tests (tests/problems.py's exact solutions,
gradient_tests.py, event_tests.py), written anew.
"""

from __future__ import annotations

import math

import pytest
import torch

import paraseq

torchdiffeq = pytest.importorskip("torchdiffeq")

F64 = torch.float64
FIXED = ["euler", "midpoint", "heun2", "heun3", "rk4"]
ADAPTIVE = ["dopri5", "bosh3", "fehlberg2", "adaptive_heun"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Sine(torch.nn.Module):
    """y' = 2 y / t + t^4 sin(2t) - t^2 + 4 t^3 (torchdiffeq's sine problem), exact solution
    y = -t^4 cos(2t) / 2 + t^4 sin(2t) / 2 ... here the simpler y' = cos(t) * a with y = a
    sin(t) + y0, per row a."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[1.0], [0.5], [-2.0]], dtype=F64))

    def forward(self, t, y):
        return self.a * torch.cos(t) + 0.0 * y

    def exact(self, t, y0):
        return y0 + self.a * torch.sin(t)[:, None, None]


class Linear(torch.nn.Module):
    """y' = A y for a damped rotation, y = expm(A t) y0 (torchdiffeq's linear problem)."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.tensor([[-0.1, -2.0], [2.0, -0.1]], dtype=F64))

    def forward(self, t, y):
        return y @ self.A.T

    def exact(self, t, y0):
        return torch.stack([y0 @ torch.linalg.matrix_exp(self.A.detach() * s).T for s in t])


PROBLEMS = {"sine": Sine, "linear": Linear}


def _y0(name):
    return torch.tensor([[0.5], [1.0], [-0.3]], dtype=F64) if name == "sine" else \
        torch.tensor([[1.0, 0.2], [-0.4, 0.7]], dtype=F64)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", FIXED)
def test_fixed_grid_methods_agree_to_rounding(problem, method):
    f = PROBLEMS[problem]()
    y0 = _y0(problem)
    t = torch.linspace(0, 3, 25, dtype=F64)
    with torch.no_grad():
        ours = paraseq.odeint(f, y0, t, method=method)
        theirs = torchdiffeq.odeint(f, y0, t, method=method)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
        # step_size grids: the same grid and the same linear interpolation at t
        tt = torch.tensor([0.0, 0.33, 1.0, 2.9], dtype=F64)
        ours = paraseq.odeint(f, y0, tt, method=method, options={"step_size": 0.05})
        theirs = torchdiffeq.odeint(f, y0, tt, method=method, options={"step_size": 0.05})
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_methods_meet_the_tolerance_as_torchdiffeq(problem, method):
    f = PROBLEMS[problem]()
    y0 = _y0(problem)
    t = torch.linspace(0, 3, 7, dtype=F64)
    rtol = atol = 1e-6
    with torch.no_grad():
        exact = f.exact(t, y0)
        ours = paraseq.odeint(f, y0, t, method=method, rtol=rtol, atol=atol)
        theirs = torchdiffeq.odeint(f, y0, t, method=method, rtol=rtol, atol=atol)
    e_ours = float((ours - exact).abs().max())
    e_theirs = float((theirs - exact).abs().max())
    # both are local-error controllers at the same tolerance: the global errors are of the
    # tolerance's size; paraseq's within 10x of torchdiffeq's or of the tolerance itself
    assert e_ours <= max(10 * e_theirs, 10 * rtol), (e_ours, e_theirs)


def test_defaults_and_dtype_rules_alike():
    f = Linear()
    y0 = _y0("linear")
    t = torch.linspace(0, 2, 5, dtype=F64)
    with torch.no_grad():
        ours = paraseq.odeint(f, y0, t)
        theirs = torchdiffeq.odeint(f, y0, t)
        assert ours.dtype == theirs.dtype == F64
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        # float32 y0 with float64 t: both compute in float32
        ours = paraseq.odeint(f.float(), y0.float(), t, method="rk4")
        theirs = torchdiffeq.odeint(f, y0.float(), t, method="rk4")
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_tuple_and_scalar_states_alike():
    t = torch.linspace(0, 1, 6, dtype=F64)

    def f(s, state):
        x, v = state
        return (v, -x)

    state = (torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    with torch.no_grad():
        for method in ["rk4", "dopri5"]:
            ours = paraseq.odeint(f, state, t, method=method)
            theirs = torchdiffeq.odeint(f, state, t, method=method)
            for a, b in zip(ours, theirs, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if method == "dopri5"
                                           else 1e-12)
        y0 = torch.tensor(2.0, dtype=F64)
        ours = paraseq.odeint(lambda s, y: -y, y0, t, method="rk4")
        theirs = torchdiffeq.odeint(lambda s, y: -y, y0, t, method="rk4")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)


def test_backwards_in_time_alike():
    f = Linear()
    y0 = _y0("linear")
    t = torch.linspace(2, 0, 5, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(paraseq.odeint(f, y0, t, method="rk4"),
                                   torchdiffeq.odeint(f, y0, t, method="rk4"), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("method", ["rk4", "midpoint"])
def test_fixed_grid_gradients_agree(method):
    f = Linear()
    y0 = _y0("linear").requires_grad_(True)
    t = torch.linspace(0, 2, 9, dtype=F64)
    w = torch.randn(9, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    params = [y0, f.A]
    ours = torch.autograd.grad((paraseq.odeint(f, y0, t, method=method) * w).sum(), params)
    theirs = torch.autograd.grad((torchdiffeq.odeint(f, y0, t, method=method) * w).sum(),
                                 params)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_adjoint_gradients_agree_to_the_tolerance():
    f = Linear()
    y0 = _y0("linear").requires_grad_(True)
    t = torch.linspace(0, 2, 5, dtype=F64)
    kw = dict(rtol=1e-9, atol=1e-10, method="dopri5")
    ours = torch.autograd.grad(paraseq.odeint_adjoint(f, y0, t, **kw).pow(2).sum(),
                               [y0, f.A])
    theirs = torch.autograd.grad(torchdiffeq.odeint_adjoint(f, y0, t, **kw).pow(2).sum(),
                                 [y0, f.A])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_event_times_agree():
    g = 9.81

    def f(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -g)])

    y0 = torch.tensor([3.0, 1.0], dtype=F64, requires_grad=True)
    t0 = torch.tensor(0.0, dtype=F64)
    kw = dict(rtol=1e-9, atol=1e-10, method="dopri5")
    te_ours, sol_ours = paraseq.odeint_event(f, y0, t0, event_fn=lambda t, y: y[0], **kw)
    te_theirs, sol_theirs = torchdiffeq.odeint_event(f, y0, t0, event_fn=lambda t, y: y[0],
                                                     **kw)
    exact = (1.0 + math.sqrt(1.0 + 2 * g * 3.0)) / g
    assert abs(float(te_ours.detach()) - exact) < 1e-9
    assert abs(float(te_ours.detach()) - float(te_theirs.detach())) < 1e-6
    torch.testing.assert_close(sol_ours.detach(), sol_theirs.detach(), rtol=0, atol=1e-6)
    (d_ours,) = torch.autograd.grad(te_ours, y0)
    (d_theirs,) = torch.autograd.grad(te_theirs, y0)
    torch.testing.assert_close(d_ours, d_theirs, rtol=1e-5, atol=1e-7)


def test_invalid_method_is_a_value_error_in_both():
    f = Linear()
    y0 = _y0("linear")
    t = torch.linspace(0, 1, 3, dtype=F64)
    for odeint in (paraseq.odeint, torchdiffeq.odeint):
        with pytest.raises(ValueError, match='Invalid method "rk45"'):
            odeint(f, y0, t, method="rk45")
