"""paraseq.odeint / odeint_implicit: every solver against an independent stepping of the same
scheme, convergence orders, gradients against autograd through the stepping, chaos, the
failure policies, bad input, and the CLI.

Shape letters: T grid points, B batch, D state size.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import paraseq
from paraseq import ConvergenceError, odeint_implicit
from paraseq.ode import SCHEMES, SOLVERS, choose_solver
from paraseq.ode.examples import (
    COMPETITION,
    Competition,
    Lorenz,
    Mathieu,
    Pendulum,
    VanDerPol,
    scipy_reference,
)

F64 = torch.float64
# This file holds the implicit schemes on the grid to their references; odeint's own default
# (torchdiffeq's: adaptive dopri5) is tests/test_odeint_dropin.py's. Here the default is the
# trapezoid, as it was before odeint took torchdiffeq's defaults; a method= given wins.
odeint = functools.partial(paraseq.odeint, method="trapezoid")
METHODS = list(SCHEMES)
ORDERS = {name: tab.order for name, tab in SCHEMES.items()}
PARALLEL = ["newton", "quasi_newton", "damped_newton", "picard"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small problems: one torch thread is fastest, and steady on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- references

def ref_step(f, method, t0, t1, y0, iters=60):
    """One step of the Runge-Kutta scheme in its K form, k_i = f(t0 + c_i h, y0 + h sum_j
    a_ij k_j), by plain fixed-point iteration (a contraction for the small h used here), then
    y1 = y0 + h sum_i b_i k_i. Differentiable by plain autograd through every iteration."""
    tab = SCHEMES[method]
    h = t1 - t0
    s = len(tab.b)
    k = [f(t0 + tab.c[i] * h, y0) for i in range(s)]
    for _ in range(iters):
        Y = [y0 + h * sum(tab.A[i][j] * k[j] for j in range(s)) for i in range(s)]
        k = [f(t0 + tab.c[i] * h, Y[i]) for i in range(s)]
    return y0 + h * sum(tab.b[i] * k[i] for i in range(s))


def ref_odeint(f, y0, t, method):
    """The scheme stepped in time, written without paraseq: (T, ..., D)."""
    out = [y0]
    for i in range(t.shape[0] - 1):
        out.append(ref_step(f, method, t[i], t[i + 1], out[-1]))
    return torch.stack(out)


class Forced(torch.nn.Module):
    """A nonlinear, non-autonomous vector field with parameters: y' = tanh(y W^T + b) sin(2t)
    ... - 0.5 y, row-independent over the batch."""

    def __init__(self, D, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=F64) * 0.8)
        self.b = torch.nn.Parameter(torch.randn(D, generator=g, dtype=F64) * 0.3)

    def forward(self, t, y):
        return torch.tanh(y @ self.W.T + self.b) * (1 + 0.5 * torch.sin(2 * t)) - 0.5 * y


def scheme_residuals(f, method, y, t):
    """max over the batch of |y_k - ref_step(y_{k-1})| / (1 + |.|), per step: (T-1,)."""
    res = []
    with torch.no_grad():
        for k in range(1, t.shape[0]):
            want = ref_step(f, method, t[k - 1], t[k], y[k - 1])
            res.append(float(((y[k] - want).abs() / (1 + want.abs())).max()))
    return torch.tensor(res, dtype=F64)


# ----------------------------------------------------------------------------- values

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("solver", ["sequential", *PARALLEL, "auto"])
def test_every_solver_is_the_scheme_stepped_in_time(method, solver):
    f = Forced(3)
    y0 = torch.randn(2, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.0, 1.5, 23, dtype=F64)  # 22 steps: not a power of two
    with torch.no_grad():
        want = ref_odeint(f, y0, t, method)
        got, info = odeint(f, y0, t, method=method, solver=solver, return_info=True)
    assert got.shape == (23, 2, 2, 3) and torch.equal(got[0], y0)
    assert info.converged and info.residual <= 1e-10
    assert (got - want).abs().max().item() <= 1e-9


def _linear_problem():
    """y' = A y, exact by scipy.linalg.expm (independent of torch)."""
    expm = pytest.importorskip("scipy.linalg").expm
    A = torch.tensor([[-0.2, 1.0, 0.0], [-1.0, -0.2, 0.3], [0.0, -0.3, -0.5]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5, -0.5], dtype=F64)

    def exact(t):  # (T,) evenly spaced -> (T, D): y(t_k) = expm(A h)^k y(t_0), two expm
        # calls (scipy's expm costs milliseconds per matrix, stacked or not)
        tt, An, y = t.numpy(), A.numpy(), y0.numpy()
        out = [expm(An * tt[0]) @ y]
        if len(tt) > 1:
            h = tt[1] - tt[0]
            assert np.allclose(np.diff(tt), h, rtol=1e-12, atol=0)
            E = expm(An * h)
            for _ in range(len(tt) - 1):
                out.append(E @ out[-1])
        return torch.from_numpy(np.stack(out))

    return (lambda t, y: y @ A.T), y0, exact


def _logistic_problem():
    y0 = torch.tensor([0.1], dtype=F64)
    return (lambda t, y: y * (1 - y)), y0, (lambda t: 1 / (1 + 9 * torch.exp(-t))[:, None])


@pytest.mark.parametrize("problem", ["linear", "logistic"])
@pytest.mark.parametrize("method", METHODS)
def test_convergence_order(problem, method):
    f, y0, exact = {"linear": _linear_problem, "logistic": _logistic_problem}[problem]()
    order = ORDERS[method]
    tend = 4.0
    steps = {1: [32, 64, 128, 256], 4: [4, 8, 16, 32], 5: [4, 6, 8, 12],
             6: [4, 6, 8, 12]}.get(order, [8, 16, 32, 64])
    errs = []
    for n in steps:
        t = torch.linspace(0, tend, n + 1, dtype=F64)
        y = odeint(f, y0, t, method=method)
        want = exact(t)  # (T, D)
        errs.append((y - want).abs().max().item())
    slope = np.polyfit(np.log([tend / n for n in steps]), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.2, (errs, slope)


def test_backwards_in_time():
    f, y0, exact = _linear_problem()
    t = torch.linspace(3.0, 0.0, 61, dtype=F64)  # decreasing: integrate backwards
    y3 = exact(torch.tensor([3.0], dtype=F64))[0]
    y = odeint(f, y3, t, method="gauss_legendre_4")
    assert (y[-1] - y0).abs().max().item() <= 1e-6
    fwd = odeint(f, y0, t.flip(0), method="gauss_legendre_4")
    assert (fwd[-1] - y3).abs().max().item() <= 1e-6


def test_substeps_refine_between_output_times():
    f = Forced(2)
    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    t = torch.tensor([0.0, 0.4, 0.5, 1.3], dtype=F64)  # uneven
    fine = torch.cat([torch.linspace(a, b, 5, dtype=F64)[:-1] for a, b in itertools.pairwise(t)]
                     + [t[-1:]])
    with torch.no_grad():
        got = odeint(f, y0, t, options={"substeps": 4})
        want = odeint(f, y0, fine, solver="sequential")[::4]
    assert got.shape == (4, 2)
    assert (got - want).abs().max().item() <= 1e-9


def test_single_time_point_and_single_step():
    f = Forced(2)
    y0 = torch.randn(3, 2, dtype=F64)
    out = odeint(f, y0, torch.tensor([0.5], dtype=F64))
    assert out.shape == (1, 3, 2) and torch.equal(out[0], y0)
    t = torch.tensor([0.0, 0.1], dtype=F64)
    with torch.no_grad():
        assert torch.allclose(odeint(f, y0, t)[1], ref_step(f, "trapezoid", t[0], t[1], y0),
                              atol=1e-12)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(2, 40), batch=st.lists(st.integers(1, 3), max_size=2),
       D=st.integers(1, 3), method=st.sampled_from(METHODS),
       solver=st.sampled_from(["newton", "quasi_newton", "picard"]), seed=st.integers(0, 99))
def test_property_shapes_and_agreement(T, batch, D, method, solver, seed):
    f = Forced(D, seed)
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(*batch, D, dtype=F64, generator=g)
    t = torch.sort(torch.rand(T, dtype=F64, generator=g) * 2).values
    t = t + torch.arange(T, dtype=F64) * 1e-3  # strictly increasing
    with torch.no_grad():
        got = odeint(f, y0, t, method=method, solver=solver)
        want = odeint(f, y0, t, method=method, solver="sequential")
    assert got.shape == (T, *batch, D)
    assert (got - want).abs().max().item() <= 1e-9


def test_float32_follows_the_inputs():
    f = Forced(3).float()
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))  # not the global RNG's
    t = torch.linspace(0, 2, 50)
    with torch.no_grad():
        got, info = odeint(f, y0, t, return_info=True)
        want = ref_odeint(Forced(3), y0.double(), t.double(), "trapezoid")
    assert got.dtype == torch.float32 and info.tol == 1e-5 and info.converged
    assert (got.double() - want).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- gradients

def _assert_grads_close(got, want, rtol=1e-8):
    for g, r in zip(got, want, strict=True):
        assert (g - r).abs().max().item() <= rtol * (1 + r.abs().max().item())


@pytest.mark.parametrize("method", ["trapezoid", "gauss_legendre_4", "backward_euler"])
@pytest.mark.parametrize("solver", [*PARALLEL, "sequential"])
def test_gradients_equal_autograd_through_the_stepping(method, solver):
    f = Forced(3, seed=4)
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    y0.requires_grad_(True)
    t = torch.linspace(0.0, 1.2, 17, dtype=F64).requires_grad_(True)
    w = torch.randn(17, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    params = [y0, t, f.W, f.b]
    got = torch.autograd.grad((odeint(f, y0, t, method=method, solver=solver) * w).sum(),
                              params)
    want = torch.autograd.grad((ref_odeint(f, y0, t, method) * w).sum(), params)
    _assert_grads_close(got, want)


@pytest.mark.parametrize("solver", ["newton", "picard"])
@pytest.mark.parametrize("variant", ["decreasing t", "substeps 2"])
def test_gradients_backwards_in_time_and_with_substeps(variant, solver):
    # the reference steps the grid odeint steps: t reversed, or t refined k = 2 times evenly
    # (built from t by the same arithmetic, so the gradients to t flow alike)
    f = Forced(3, seed=8)
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    y0.requires_grad_(True)
    t = torch.tensor([0.0, 0.15, 0.4, 0.5, 0.8, 1.1, 1.2], dtype=F64)
    if variant == "decreasing t":
        t = t.flip(0)
    t.requires_grad_(True)
    w = torch.randn(7, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    params = [y0, t, f.W, f.b]
    k = 2 if variant == "substeps 2" else 1
    y = odeint(f, y0, t, method="gauss_legendre_4", solver=solver, options={"substeps": k})
    got = torch.autograd.grad((y * w).sum(), params)
    frac = torch.arange(k, dtype=F64) / k
    fine = torch.cat([(t[:-1, None] + (t[1:] - t[:-1])[:, None] * frac).reshape(-1), t[-1:]])
    ref = ref_odeint(f, y0, fine, "gauss_legendre_4")[::k]
    want = torch.autograd.grad((ref * w).sum(), params)
    _assert_grads_close(got, want)


def test_gradients_through_the_fallback_windows():
    # Lorenz over [0, 1]: Newton over the whole grid stops at step ~50, the windows take
    # over; the gradient (to y0, t and sigma) flows through every window's adjoint and the
    # states carried between windows. Reference: autograd through the sequential stepping.
    sigma = torch.tensor(10.0, dtype=F64, requires_grad=True)
    f = Lorenz(sigma=sigma)
    y0 = torch.tensor([1.0, 1.0, 1.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 101, dtype=F64).requires_grad_(True)
    w = torch.randn(101, 3, dtype=F64, generator=torch.Generator().manual_seed(11))
    params = [y0, t, sigma]
    y, info = odeint(f, y0, t, return_info=True)
    assert info.fell_back and info.windows > 1 and info.converged
    got = torch.autograd.grad((y * w).sum(), params)
    want = torch.autograd.grad((odeint(f, y0, t, solver="sequential") * w).sum(), params)
    # the trajectories agree to ~steps x tol, amplified by chaos: a looser bound than above
    _assert_grads_close(got, want, rtol=1e-7)


@pytest.mark.parametrize("method", ["trapezoid", "gauss_legendre_4"])
def test_gradcheck(method):
    W = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(7)) * 0.5
    W.requires_grad_(True)
    y0 = torch.tensor([0.3, -0.4], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.2, 0.35, 0.6], dtype=F64, requires_grad=True)

    def run(y0, t, W):
        return odeint(lambda s, y: torch.sin(y @ W.T) * torch.cos(s) - 0.2 * y, y0, t,
                      method=method)

    assert gradcheck(run, (y0, t, W))


def test_module_parameters_get_gradients_by_backward():
    f = Forced(2)
    y0 = torch.tensor([0.5, -0.5], dtype=F64)
    y = odeint(f, y0, torch.linspace(0, 1, 30, dtype=F64))
    y[-1].square().sum().backward()
    assert f.W.grad is not None and f.W.grad.abs().sum() > 0
    assert f.b.grad is not None and f.b.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- DAEs

def _dae(w):
    """y' = -y + z, 0 = z - w cos t: y is an ODE driven by the algebraic z."""
    def F(t, y, dy):
        return torch.stack([dy[..., 0] + y[..., 0] - y[..., 1],
                            y[..., 1] - w * torch.cos(t)], dim=-1)
    return F


def _dae_backward_euler(w, y0, t):
    """Backward Euler on the DAE in closed form: z_k = w cos t_k, y_k = (y + h z_k)/(1 + h)."""
    out, y = [y0], y0[0]
    for k in range(1, t.shape[0]):
        h = t[k] - t[k - 1]
        z = w * torch.cos(t[k])
        y = (y + h * z) / (1 + h)
        out.append(torch.stack([y, z]))
    return torch.stack(out)


@pytest.mark.parametrize("solver", ["sequential", "newton", "quasi_newton", "damped_newton"])
def test_implicit_dae_backward_euler(solver):
    w = torch.tensor(0.7, dtype=F64)
    y0 = torch.stack([torch.tensor(0.2, dtype=F64), w])  # consistent: z(0) = w
    t = torch.linspace(0, 3, 41, dtype=F64)
    with torch.no_grad():
        got, info = odeint_implicit(_dae(w), y0, t, solver=solver, return_info=True)
    assert info.converged and info.method == "backward_euler"
    assert (got - _dae_backward_euler(w, y0, t)).abs().max().item() <= 1e-10


def test_implicit_dae_order_and_gradients():
    w = torch.tensor(0.7, dtype=F64, requires_grad=True)
    errs = []
    for n in (20, 40, 80, 160):
        t = torch.linspace(0, 2, n + 1, dtype=F64)
        y0 = torch.stack([torch.tensor(0.2, dtype=F64), w.detach()])
        y = odeint_implicit(_dae(w.detach()), y0, t)
        # exact: y' + y = w cos t, y(0) = 0.2
        ex = 0.5 * w.detach() * (torch.cos(t) + torch.sin(t)) + (0.2 - 0.5 * w.detach()) * \
            torch.exp(-t)
        errs.append((y[:, 0] - ex).abs().max().item())
    slope = np.polyfit(np.log([2 / n for n in (20, 40, 80, 160)]), np.log(errs), 1)[0]
    assert abs(slope - 1) <= 0.2
    t = torch.linspace(0, 2, 21, dtype=F64)
    y0 = torch.stack([torch.tensor(0.2, dtype=F64), w])
    (g,) = torch.autograd.grad(odeint_implicit(_dae(w), y0, t)[:, 0].sum(), w)
    (r,) = torch.autograd.grad(_dae_backward_euler(w, y0, t)[:, 0].sum(), w)
    assert abs(g.item() - r.item()) <= 1e-10
    assert gradcheck(lambda w_: odeint_implicit(_dae(w_), torch.stack([w_ * 0 + 0.2, w_]), t),
                     (w,))


# ----------------------------------------------------------------------------- chaos, failure

def test_lorenz_stays_correct_at_every_step():
    f = Lorenz()
    y0 = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    t = torch.linspace(0, 3, 301, dtype=F64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, info = odeint(f, y0, t, method="gauss_legendre_4", return_info=True)
    assert not caught  # the fallback is silent: solve_recurrence's warnings do not leak
    # Newton over the whole grid does not reach the end (chaos): windows take over
    assert info.fell_back and info.windows > 1 and info.converged
    assert info.step_residuals.shape == (300,) and info.step_residuals.max() <= 1e-10
    # and, checked independently, every step satisfies the discrete scheme
    assert scheme_residuals(f, "gauss_legendre_4", y, t).max().item() <= 1e-9


def test_on_failure_raise_and_warn():
    f = Lorenz()
    y0 = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    t = torch.linspace(0, 6, 601, dtype=F64)
    with pytest.raises(ConvergenceError, match="odeint: solver='newton' stopped"):
        odeint(f, y0, t, on_failure="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = odeint(f, y0, t, on_failure="warn", return_info=True)
    assert any("odeint: solver='newton' did not converge" in str(w.message) for w in caught)
    assert not info.converged and info.residual > 1e-10


def test_warnings_of_func_pass_through():
    def f(t, y):
        warnings.warn("from func", UserWarning, stacklevel=2)
        return -y

    with pytest.warns(UserWarning, match="from func"):
        odeint(f, torch.ones(2, dtype=F64), torch.linspace(0, 1, 30, dtype=F64))


def test_a_step_too_large_for_its_local_equations_is_reported():
    # Van der Pol, mu = 100: backward Euler with h = 0.05 cannot solve the steps of the fast
    # jump (h mu |1 - x^2| > 1 there): no solver can, and odeint says so
    f = VanDerPol(100.0)
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 100, 2001, dtype=F64)
    with pytest.raises(ConvergenceError, match="does not satisfy the backward_euler scheme"):
        odeint(f, y0, t, method="backward_euler")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = odeint(f, y0, t, method="backward_euler", on_failure="warn",
                         return_info=True)
    assert any("does not satisfy" in str(w.message) for w in caught)
    assert not info.converged


def test_window_option_and_info():
    f = Forced(2)
    y0 = torch.tensor([0.5, -0.5], dtype=F64)
    t = torch.linspace(0, 3, 101, dtype=F64)
    with torch.no_grad():
        got, info = odeint(f, y0, t, options={"window": 30}, return_info=True)
        want = odeint(f, y0, t, solver="sequential")
    assert (got - want).abs().max().item() <= 1e-9
    assert info.windows == 3 and not info.fell_back  # 30, 60 (doubled), the last 10
    assert info.solver == "newton" and info.method == "trapezoid" and info.steps == 100
    assert info.step_calls > 0 and info.newton_iterations >= info.step_calls
    assert len(info.residuals) >= info.iterations


def test_func_that_vmap_cannot_batch():
    def f(t, y):  # a Python branch on t: fine one point at a time, not under vmap
        return -y if float(t) > 0.5 else -2 * y

    y0 = torch.ones(2, dtype=F64)
    t = torch.linspace(0, 1, 41, dtype=F64)
    y = odeint(f, y0, t, solver="sequential", method="gauss_legendre_4")
    assert abs(y[-1, 0].item() - math.exp(-1.5)) <= 1e-6
    # the parallel solver asked for by name calls it point by point, and says so
    y2, info = odeint(f, y0, t, solver="newton", method="gauss_legendre_4", return_info=True)
    assert not info.vectorised and "vmap" in info.vmap_error and info.solver == "newton"
    assert (y2 - y).abs().max().item() <= 1e-9


def test_choose_solver():
    cpu = torch.device("cpu")
    assert choose_solver(10, 1, 2, cpu) == "sequential"
    assert choose_solver(1000, 1, 8, cpu) == "newton"
    assert choose_solver(1000, 4096, 2, cpu) == "sequential"
    _, info = odeint(Forced(2), torch.zeros(2, dtype=F64), torch.linspace(0, 1, 8, dtype=F64),
                     solver="auto", return_info=True)
    assert info.solver == "sequential"


# ----------------------------------------------------------------------------- bad input

def test_bad_input():
    f = Forced(2)
    y0 = torch.zeros(2, dtype=F64)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"strictly increasing or strictly decreasing; "
                                         r"t\[1\] = 0\.5, t\[2\] = 0\.5"):
        odeint(f, y0, torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="strictly"):
        odeint(f, y0, torch.tensor([0.0, 0.5, 0.2], dtype=F64))
    with pytest.raises(ValueError, match="1-D"):
        odeint(f, y0, t.reshape(5, 1))
    # torchdiffeq's rule: the solve runs in y0's dtype, t is cast to it
    assert odeint(f, y0, t.float()).dtype == F64
    with pytest.raises(ValueError, match="t is on meta but y0 is on cpu"):
        odeint(f, y0, t.to("meta"))
    with pytest.raises(ValueError, match="nan"):
        odeint(f, y0, torch.tensor([0.0, float("nan")], dtype=F64))
    with pytest.raises(ValueError, match=r"shaped like y0, \(2,\); got shape \(3,\)"):
        odeint(lambda s, y: torch.cat([y, y[:1]]), y0, t)
    with pytest.raises(TypeError, match="must return a tensor"):
        odeint(lambda s, y: 1.0, y0, t)
    with pytest.raises(TypeError, match="keep y's dtype"):
        odeint(lambda s, y: y.float(), y0, t)
    with pytest.raises(ValueError, match=r"Invalid method \"rk45\"\. Must be one of "
                                         r"'backward_euler'"):
        odeint(f, y0, t, method="rk45")
    with pytest.raises(ValueError, match="unknown solver 'jacobi'; valid: 'newton'"):
        odeint(f, y0, t, solver="jacobi")
    with pytest.raises(ValueError, match="unknown option"):
        odeint(f, y0, t, options={"first_step": 0.1})
    with pytest.raises(ValueError, match=r"options\['substeps'\] must be an int >= 1"):
        odeint(f, y0, t, options={"substeps": 0})
    with pytest.raises(ValueError, match="on_failure"):
        odeint(f, y0, t, on_failure="ignore")
    with pytest.raises(ValueError, match="tol must be a positive"):
        odeint(f, y0, t, tol=-1.0)
    with pytest.raises(ValueError, match="state dim"):
        odeint_implicit(lambda s, y, dy: dy + y, torch.tensor(1.0, dtype=F64), t)
    with pytest.raises(TypeError, match="float32 or float64"):
        odeint(f, torch.zeros(2, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="callable"):
        odeint("f", y0, t)
    with pytest.raises(ValueError, match="unknown method 'trapezoid'; valid: 'backward_euler'"):
        odeint_implicit(lambda s, y, dy: dy + y, y0, t, method="trapezoid")
    assert "auto" in SOLVERS and paraseq.odeint is odeint.func


# ----------------------------------------------------------------------------- the examples

def _example(name):
    """(field, y0, t_end, steps, scipy method) for the worked examples, small."""
    g = torch.linspace(0.05, 1.2, 2, dtype=F64)
    ics = torch.stack(torch.meshgrid(g, g, indexing="ij"), dim=-1).reshape(-1, 2)
    return {
        "coexistence": (Competition(**COMPETITION["coexistence"]), ics, 10.0, 40, "DOP853"),
        "exclusion": (Competition(**COMPETITION["exclusion"]), ics, 10.0, 80, "DOP853"),
        "mathieu": (Mathieu(torch.tensor([[1.0], [4.0]]), torch.tensor([[0.5], [2.0]])),
                    torch.eye(2, dtype=F64).expand(2, 2, 2), math.pi, 16, "DOP853"),
        "pendulum": (Pendulum(torch.tensor([200.0, 50.0])),
                     torch.tensor([[0.2, 0.0], [0.2, 0.0]], dtype=F64), 0.3, 150, "DOP853"),
        "vanderpol_1": (VanDerPol(1.0), torch.tensor([2.0, 0.0], dtype=F64), 6.0, 40, "Radau"),
        "vanderpol_10": (VanDerPol(10.0), torch.tensor([2.0, 0.0], dtype=F64), 6.0, 400,
                         "Radau"),
        "lorenz": (Lorenz(), torch.tensor([1.0, 1.0, 1.0], dtype=F64), 1.0, 80, "DOP853"),
    }[name]


@pytest.mark.parametrize(("name", "method"), [
    *((n, "gauss_legendre_4") for n in ("coexistence", "exclusion", "mathieu", "pendulum",
                                        "vanderpol_1", "vanderpol_10", "lorenz")),
    ("coexistence", "trapezoid"), ("pendulum", "trapezoid"), ("vanderpol_10", "trapezoid")])
def test_examples_against_scipy(name, method):
    # the error at the grid points against solve_ivp (rtol 1e-10) falls like h^order
    pytest.importorskip("scipy")
    f, y0, tend, n, ref_method = _example(name)
    order = ORDERS[method]
    n = n if order == 2 else max(8, n // 2)
    errs = []
    for steps in (n, 2 * n):
        t = torch.linspace(0, tend, steps + 1, dtype=F64)
        with torch.no_grad():
            y, info = odeint(f, y0, t, method=method, return_info=True)
        assert info.converged
        ref = scipy_reference(f, y0, t, method=ref_method)
        errs.append(np.abs(y.numpy() - ref)[::2 if steps == 2 * n else 1].max())
    assert errs[0] < 0.1 * (1 + np.abs(ref).max())
    assert abs(math.log2(errs[0] / errs[1]) - order) <= 0.3, errs


def test_mathieu_chart_closed_form_and_scipy():
    # q = 0: x'' + a x = 0, so the monodromy matrix over [0, pi] has trace 2 cos(sqrt(a) pi)
    # (2 cosh(sqrt(-a) pi) for a < 0); q = 1 against solve_ivp and the characteristic values
    # of scipy.special (the stability boundaries b_1(1) < 1 < a_1(1) < 3 < b_2(1))
    scipy_special = pytest.importorskip("scipy.special")
    from paraseq.ode.examples import mathieu_chart

    a = torch.tensor([-1.5, -0.3, 0.5, 1.0, 2.5, 3.0, 7.0], dtype=F64)
    q = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        half_trace, info = mathieu_chart(a, q, points=101)
    assert info.converged and half_trace.shape == (7, 2)
    r = a.abs().sqrt() * math.pi
    exact = torch.where(a >= 0, torch.cos(r).abs(), torch.cosh(r))
    assert ((half_trace[:, 0] - exact).abs() / (1 + exact)).max().item() <= 1e-6
    t = torch.linspace(0, math.pi, 101, dtype=F64)
    for i in (3, 5):  # a = 1 and a = 3
        ref = scipy_reference(Mathieu(a[i], q[1]), torch.eye(2, dtype=F64), t)  # (T, 2, 2)
        want = abs(ref[-1, 0, 0] + ref[-1, 1, 1]) / 2
        assert abs(half_trace[i, 1].item() - want) <= 1e-6 * (1 + want)
    assert scipy_special.mathieu_b(1, 1.0) < 1.0 < scipy_special.mathieu_a(1, 1.0)
    assert half_trace[3, 1] > 1  # a = 1, q = 1: inside the first instability tongue
    assert scipy_special.mathieu_a(1, 1.0) < 3.0 < scipy_special.mathieu_b(2, 1.0)
    assert half_trace[5, 1] < 1  # a = 3, q = 1: between the tongues, stable


def test_pendulum_upright_for_a_fast_pivot_falls_for_a_slow_one():
    # Kapitza: with l = 0.2, h0 = 0.02 the upright position is stable for w > 99
    f = Pendulum(torch.tensor([200.0, 50.0]))
    assert 50 < f.kapitza_w() < 200
    y0 = torch.tensor([[0.2, 0.0], [0.2, 0.0]], dtype=F64)
    t = torch.linspace(0, 2, 1001, dtype=F64)
    with torch.no_grad():
        y, info = odeint(f, y0, t, method="gauss_legendre_4", return_info=True)
    assert info.converged
    late = y[500:, :, 0].abs().amax(0)  # max |theta| over [1, 2], (2,)
    assert late[0] < 0.5, late  # w = 200: oscillates about the upright
    assert late[1] > 1.0, late  # w = 50: falls over


def test_vanderpol_stiff_through_a_fast_jump_against_radau():
    # mu = 100 from the slow manifold near x = 1: the jump to x = -2 comes at t ~ 0.25, then
    # the slow phase again. Output every 0.1, 16 and 32 substeps (h mu |1 - x^2| up to ~2):
    # against Radau (rtol 1e-10) the error falls like h^4 (Gauss-Legendre)
    pytest.importorskip("scipy")
    f = VanDerPol(100.0)
    y0 = torch.tensor([1.05, -0.1024], dtype=F64)
    t = torch.linspace(0, 3, 31, dtype=F64)
    ref = scipy_reference(f, y0, t, method="Radau")
    assert ref[0, 0] > 1 and ref[-1, 0] < -1.9  # the span crosses the jump
    errs = []
    for k in (16, 32):
        with torch.no_grad():
            y, info = odeint(f, y0, t, method="gauss_legendre_4", options={"substeps": k},
                             return_info=True)
        assert info.converged
        errs.append(np.abs(y.numpy() - ref).max())
    assert errs[1] < 1e-4, errs
    assert abs(math.log2(errs[0] / errs[1]) - 4) <= 0.4, errs


def test_competition_end_states_and_equilibria():
    co = Competition(**COMPETITION["coexistence"])
    ex = Competition(**COMPETITION["exclusion"])
    # the interior equilibrium: x1 = N1 (1 - a1 x2 / r1), x2 = N2 (1 - a2 x1 / r2)
    labels = [(0.0, 0.0, False), (1.0, 0.0, False), (0.0, 1.0, False), (2 / 3, 2 / 3, True)]
    for got, want in zip(co.equilibria(), labels, strict=True):
        assert np.allclose(got[:2], want[:2], atol=1e-12) and got[2] == want[2]
    labels = [(0.0, 0.0, False), (1.0, 0.0, True), (0.0, 1.0, True), (0.4, 0.4, False)]
    for got, want in zip(ex.equilibria(), labels, strict=True):
        assert np.allclose(got[:2], want[:2], atol=1e-12) and got[2] == want[2]
    ics = torch.tensor([[0.05, 0.05], [0.05, 1.2], [1.2, 0.05], [1.2, 1.2], [0.9, 0.1],
                        [0.1, 0.9]], dtype=F64)
    t = torch.linspace(0, 40, 161, dtype=F64)
    with torch.no_grad():
        y_co = odeint(co, ics, t, method="gauss_legendre_4")[-1]  # (6, 2)
        y_ex = odeint(ex, ics, t, method="gauss_legendre_4")[-1]
    # coexistence: every run converges to (2/3, 2/3) (slowest rate 0.29: e^-11.8 at t = 40)
    assert (y_co - 2 / 3).abs().max().item() <= 1e-3
    # exclusion: one species dies out in every run, the other sits at its capacity
    assert (y_ex.amin(-1) <= 1e-3).all() and ((y_ex.amax(-1) - 1).abs() <= 1e-2).all()
    winner = y_ex.argmax(-1)
    assert winner[2] == winner[4] == 0 and winner[1] == winner[5] == 1  # the head start wins


def test_bench_section(tmp_path, capsys):
    # python -m paraseq bench --sections ode on a tiny grid: the table and bench_ode.csv
    from paraseq.bench import ode as bench_ode
    from paraseq.cli import main

    rc = main(["bench", "--sections", "ode", "--lengths", "12", "--batches", "2",
               "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "parallel (s)" in out and "vs rk4 loop" in out
    lines = (tmp_path / "bench_ode.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("pass,B,T,parallel_s,sequential_s")
    assert not (tmp_path / "bench.csv").exists()  # the gru section did not run
    row = bench_ode.measure(12, 1, True, ["parallel", "sequential"], dtype=F64, repeats=1,
                            loop_steps=5)
    assert row["sequential ~"] and row["iterations"] >= 1 and row["|par - seq|"] <= 1e-8


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("example", ["competition", "mathieu", "pendulum", "vanderpol",
                                     "lorenz"])
def test_cli_examples(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    from paraseq.cli import main

    png = tmp_path / f"{example}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["ode", example, "--quick", "--max-sequential", "100", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sequential" in out and "newton" in out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_cli_numbers(example, out)


def _column(out, name):
    """The values of column ``name`` in the CLI's results table (columns part on 2+ spaces)."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("case ") and name in line)
    head = re.split(r"\s{2,}", lines[i].strip())
    rows = []
    for line in lines[i + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return [float(r[head.index(name)]) for r in rows]


def _check_cli_numbers(example, out):
    """What the --quick runs must print: errors against scipy within the scheme's, every
    scheme residual under tol, and each example's verdicts."""
    def number(pattern):
        return float(re.search(pattern, out).group(1))

    if example != "mathieu":
        assert max(_column(out, "newton err")) <= 1e-3
        assert max(_column(out, "residual")) <= 1e-10
    if example == "competition":
        assert "equilibria: (0, 0) unstable, (1, 0) unstable, (0, 1) unstable, (0.667, 0.667) " \
               "stable" in out
        assert "equilibria: (0, 0) unstable, (1, 0) stable, (0, 1) stable, (0.4, 0.4) " \
               "unstable" in out
        assert "both in 9 of 9 runs" in out  # coexistence: every run keeps both species
    elif example == "mathieu":
        assert number(r"between them: ([\d.e+-]+)") <= 1e-9  # newton vs sequential
        assert number(r"max \|difference\| ([\d.e+-]+)") <= 1e-3  # vs scipy, 41 points
    elif example == "pendulum":
        assert number(r"w = 200\): max \|theta\| over the second half ([\d.]+) rad: stays up") \
            < 0.5
        assert number(r"w = 50\): max \|theta\| over the second half ([\d.]+) rad: falls") > 1
    elif example == "vanderpol":
        # the end errors of mu = 1: fourth order between the two substep counts
        tail = out[out.index("with 2x substeps"):]
        row = re.search(r"mu = 1 +\S+ +([\d.e+-]+) +([\d.e+-]+) +([\d.]+)", tail)
        assert float(row.group(1)) <= 1e-5 and abs(float(row.group(3)) - 4) <= 0.3
    elif example == "lorenz":
        assert number(r"largest scheme residual ([\d.e+-]+)") <= 1e-10


def test_cli_rejects_bad_arguments(capsys):
    from paraseq.cli import main

    assert main(["ode", "lorenz", "--method", "rk45"]) == 2
    assert "--method must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ode", "nonsense"])
