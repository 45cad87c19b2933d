"""paraseq.odeint as torchdiffeq's odeint: its signature, defaults, dtype rules and states; the
explicit methods parallel in time against the sequential stepper and exact solutions
(convergence orders); the adaptive grid meeting rtol/atol; the options; funcs written for
torchdiffeq (y-independent fields, Python branches on t, rows that mix); odeint_adjoint and
odeint_event; inference mode and non-finite local corrections (issue 12).

Shape letters: T output times, B batch, D state size.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import paraseq
from paraseq import ConvergenceError, odeint, odeint_adjoint, odeint_event
from paraseq.ode import ADAPTIVE, EXPLICIT

F64 = torch.float64
FIXED = [n for n in EXPLICIT if n not in ADAPTIVE]
ORDERS = {n: tab.order for n, tab in EXPLICIT.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)


def linear(t, y):
    """A damped rotation: y(t) = expm(A t) y0."""
    return y @ A.T.to(y.dtype)


def linear_exact(y0, t):
    return torch.stack([y0 @ torch.linalg.matrix_exp(A * s).T for s in t.double()]).to(y0.dtype)


class Forced(torch.nn.Module):
    """y' = tanh(y W^T + b) (1 + sin(2t) / 2) - y / 2, rows independent."""

    def __init__(self, D, seed=0, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=dtype) * 0.8)
        self.b = torch.nn.Parameter(torch.randn(D, generator=g, dtype=dtype) * 0.3)

    def forward(self, t, y):
        return torch.tanh(y @ self.W.T + self.b) * (1 + 0.5 * torch.sin(2 * t)) - 0.5 * y


def rk_reference(f, y0, t, method):
    """The explicit method stepped in time from its Butcher tableau, without paraseq's code."""
    tab = EXPLICIT[method]
    out = [y0]
    for i in range(len(t) - 1):
        h = t[i + 1] - t[i]
        y = out[-1]
        ks = []
        for j in range(len(tab.b)):
            yj = y + h * sum(a * ks[m] for m, a in enumerate(tab.A[j]))
            ks.append(f(t[i] + tab.c[j] * h, yj))
        out.append(y + h * sum(b * k for b, k in zip(tab.b, ks, strict=True)))
    return torch.stack(out)


# ------------------------------------------------------------------------ issue 12's two

@pytest.mark.parametrize("method", ["trapezoid", "rk4", "dopri5"])
@pytest.mark.parametrize("solver", ["newton", "sequential"])
def test_inference_mode_as_no_grad(method, solver):
    f = Forced(3)
    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 20, dtype=F64)
    with torch.no_grad():
        want = odeint(f, y0, t, method=method, solver=solver)
    with torch.inference_mode():
        got = odeint(f, y0, t, method=method, solver=solver)
        t_inf, y_inf = t.clone(), y0.clone()  # inference tensors as inputs too
        got2 = odeint(f, y_inf, t_inf, method=method, solver=solver)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(got2, want, rtol=0, atol=1e-12)


def vdp(mu):
    def f(t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], -1)
    return f


def test_nonfinite_local_newton_correction_is_a_convergence_error():
    """Van der Pol mu = 1e3, radau_iia_3 with 4 substeps over steps far too long: a local
    Newton correction goes non-finite; the documented ConvergenceError (it was a RuntimeError
    from torch.where on a Long mask)."""
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.linspace(0, 3000, 200, dtype=F64)
    with pytest.raises(ConvergenceError, match="does not satisfy the radau_iia_3"):
        odeint(vdp(1e3), y0, t, method="radau_iia_3", options={"substeps": 4})
    with pytest.warns(RuntimeWarning, match="does not satisfy"):
        _, info = odeint(vdp(1e3), y0, t, method="radau_iia_3", options={"substeps": 4},
                         on_failure="warn", return_info=True)
    assert not info.converged


# ------------------------------------------------------------------------ signature, dtypes

def test_defaults_are_torchdiffeqs():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0, 3, 7, dtype=F64)
    y, info = odeint(linear, y0, t, return_info=True)
    assert info.method == "dopri5" and info.error_ratio <= 1 and info.rounds >= 1
    assert info.grid_sizes[-1] == info.steps
    err = float((y - linear_exact(y0, t)).abs().max())
    assert err < 1e-6
    # rtol / atol are honoured: a looser tolerance, a larger error and a coarser grid
    y2, info2 = odeint(linear, y0, t, rtol=1e-4, atol=1e-6, return_info=True)
    assert info2.steps < info.steps
    assert err < float((y2 - linear_exact(y0, t)).abs().max()) < 1e-3


def test_float32_y0_with_float64_t_runs_in_y0s_dtype():
    y0 = torch.tensor([1.0, 0.5])
    t = torch.linspace(0, 1, 5, dtype=F64)
    for method in ["dopri5", "rk4", "trapezoid"]:
        y = odeint(linear, y0, t, method=method)
        assert y.dtype == torch.float32
        want = odeint(linear, y0.double(), t, method=method)
        torch.testing.assert_close(y, want.float(), rtol=0, atol=1e-5)


def test_zero_dim_and_tuple_states():
    t = torch.linspace(0, 1, 6, dtype=F64)
    y0 = torch.tensor(1.0, dtype=F64)
    y = odeint(lambda s, y: -2 * y, y0, t)
    assert y.shape == (6,)
    torch.testing.assert_close(y, torch.exp(-2 * t), rtol=1e-6, atol=1e-8)
    # a tuple: (position (2,), velocity 0-d) of x'' = -x along a line
    d = torch.tensor([0.6, 0.8], dtype=F64)
    state = (d.clone(), torch.tensor(0.0, dtype=F64))

    def f(s, st):
        x, v = st
        return (v * d, -(x @ d))

    for method in ["dopri5", "rk4", "gl4"]:
        x, v = odeint(f, state, t, method=method, options=None if method == "dopri5"
                      else {"substeps": 20})
        assert x.shape == (6, 2) and v.shape == (6,)
        torch.testing.assert_close(x, torch.cos(t)[:, None] * d, rtol=0, atol=1e-6)
        torch.testing.assert_close(v, -torch.sin(t), rtol=0, atol=1e-6)


def test_unknown_methods_and_options_list_the_valid_ones():
    y0 = torch.ones(2, dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(ValueError, match=r'Invalid method "rk5".*gl4.*dopri5'):
        odeint(linear, y0, t, method="rk5")
    with pytest.raises(ValueError, match=r"'explicit_adams'.*multistep"):
        odeint(linear, y0, t, method="explicit_adams")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'bogus'.*'first_step'"):
        odeint(linear, y0, t, method="dopri5", options={"bogus": 1})
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'first_step'.*'step_size'"):
        odeint(linear, y0, t, method="rk4", options={"first_step": 0.1})
    with pytest.raises(ValueError, match="mutually exclusive"):
        odeint(linear, y0, t, method="rk4",
               options={"step_size": 0.1, "grid_constructor": lambda f, y, t: t})
    with pytest.raises(ValueError, match="perturb"):
        odeint(linear, y0, t, method="gl4", options={"perturb": True})
    with pytest.raises(ValueError, match="rtol"):
        odeint(linear, y0, t, rtol=-1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        odeint(linear, y0.half(), t)


def test_aliases_are_paraseqs_schemes():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0, 1, 9, dtype=F64)
    for alias, name in paraseq.ode.ALIASES.items():
        torch.testing.assert_close(odeint(linear, y0, t, method=alias),
                                   odeint(linear, y0, t, method=name), rtol=0, atol=0)


# ------------------------------------------------------------------------ explicit methods

@pytest.mark.parametrize("method", list(EXPLICIT))
@pytest.mark.parametrize("solver", ["newton", "quasi_newton", "sequential"])
def test_explicit_parallel_is_the_method_stepped_in_time(method, solver):
    f = Forced(3)
    y0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0, 2, 37, dtype=F64)
    want = rk_reference(f, y0, t, method)
    kw = {}
    if method in ADAPTIVE:  # the grid held to t: one round on t itself, a tolerance it meets
        kw = dict(rtol=10.0, atol=10.0, options={"first_step": 10.0, "max_rounds": 1})
    with torch.no_grad():
        got = odeint(f, y0, t, method=method, solver=solver, **kw)
    # each step to tol 1e-10: the trajectories drift apart by at most about steps x tol
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    if method in ADAPTIVE:
        with pytest.raises(ConvergenceError, match="did not meet rtol/atol in 1 rounds"):
            odeint(f, y0, t, method=method, solver=solver, rtol=1e-9, atol=1e-9,
                   options={"first_step": 10.0, "max_rounds": 1})


@pytest.mark.parametrize("method", FIXED)
def test_explicit_convergence_order(method):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    errs, hs = [], []
    for n in (16, 32, 64):
        t = torch.linspace(0, 2, n + 1, dtype=F64)
        y = odeint(linear, y0, t, method=method)
        errs.append(float((y[-1] - linear_exact(y0, t[-1:])[0]).abs().max()))
        hs.append(2 / n)
    slope = (math.log(errs[0]) - math.log(errs[-1])) / (math.log(hs[0]) - math.log(hs[-1]))
    assert abs(slope - ORDERS[method]) < 0.25, (method, slope, errs)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(2, 30), batch=st.lists(st.integers(1, 3), max_size=2),
       D=st.integers(1, 3), method=st.sampled_from(FIXED),
       solver=st.sampled_from(["newton", "picard", "damped_newton"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 99))
def test_property_explicit_parallel_against_sequential(T, batch, D, method, solver, dtype,
                                                       seed):
    g = torch.Generator().manual_seed(seed)
    f = Forced(D, seed, dtype)
    y0 = torch.randn(*batch, D, generator=g, dtype=dtype)
    t = torch.sort(torch.rand(T, generator=g, dtype=F64) * 3).values.to(dtype)
    t = t + torch.arange(T, dtype=dtype) * 1e-2  # strictly increasing
    with torch.no_grad():
        got = odeint(f, y0, t, method=method, solver=solver)
        want = odeint(f, y0, t, method=method, solver="sequential")
    assert got.shape == (T, *batch, D) and got.dtype == dtype
    # each step to the dtype's tol (scaled by 1 + |y|): a drift of at most about steps x tol
    scale = T * (1 + float(want.abs().max()))
    atol = 1e-10 * scale if dtype == F64 else 1e-5 * scale
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("method", ["rk4", "midpoint", "dopri5"])
def test_explicit_gradients_equal_autograd_through_the_stepping(method):
    f = Forced(2)
    y0 = torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1.5, 12, dtype=F64)
    w = torch.randn(12, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    params = [y0, *f.parameters()]
    y, info = odeint(f, y0, t, method=method, return_info=True)
    got = torch.autograd.grad((y * w).sum(), params)
    # the same grid stepped sequentially (adaptive: the grid the parallel solve settled on)
    grid = info.grid
    ys = rk_reference(f, y0, grid, method)
    idx = [int(torch.nonzero(grid == s)[0]) for s in t]
    want = torch.autograd.grad((ys[idx] * w).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_gradcheck_rk4_parallel():
    W = torch.tensor([[0.2, -0.5], [0.4, 0.1]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 6, dtype=F64, requires_grad=True)

    def fn(y0, W, t):
        return odeint(lambda s, y: torch.tanh(y @ W.T) * torch.cos(s), y0, t, method="rk4",
                      solver="newton")

    y0 = torch.tensor([[0.5, -0.3]], dtype=F64, requires_grad=True)
    assert gradcheck(fn, (y0, W, t), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ adaptive grid

@pytest.mark.parametrize("method", list(ADAPTIVE))
def test_adaptive_meets_the_tolerance(method):
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.linspace(0, 4, 5, dtype=F64)
    errs = []
    for tol in (1e-4, 1e-7):
        y, info = odeint(linear, y0, t, method=method, rtol=tol, atol=tol, return_info=True)
        assert info.error_ratio <= 1 and info.converged
        errs.append(float((y - linear_exact(y0, t)).abs().max()))
        assert errs[-1] < 100 * tol * 4, (method, tol, errs[-1], info.steps)
    assert errs[1] < errs[0]


def test_adaptive_parallel_equals_sequential_and_reverse_time():
    f = Forced(3)
    y0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0, 3, 4, dtype=F64)
    with torch.no_grad():
        a, ia = odeint(f, y0, t, rtol=1e-8, atol=1e-8, return_info=True)
        b, ib = odeint(f, y0, t, rtol=1e-8, atol=1e-8, solver="sequential", return_info=True)
        assert ia.grid_sizes == ib.grid_sizes
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # backwards from the end state comes back to y0
        back = odeint(f, a[-1], t.flip(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back[-1], y0, rtol=0, atol=1e-7)


def test_adaptive_step_t_and_max_num_steps():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for tol in (1e-7, 1e-11):  # the second refines over several rounds: the point stays
        y, info = odeint(linear, y0, t, rtol=tol, atol=tol, options={"step_t": [0.123]},
                         return_info=True)
        assert float((info.grid - 0.123).abs().min()) < 1e-15 and y.shape == (2, 2)
        torch.testing.assert_close(y, linear_exact(y0, t), rtol=0, atol=1e3 * tol)
    assert info.rounds >= 2
    with pytest.raises(RuntimeError, match="max_num_steps exceeded"):
        odeint(linear, y0, t, rtol=1e-12, atol=1e-12, method="adaptive_heun",
               options={"max_num_steps": 50})


def test_adaptive_stiff_vdp_refines_where_it_must():
    """Van der Pol mu = 1000 over a short span by dopri5: the stability limit forces ~1e3
    steps; the answer against scipy's Radau."""
    scipy = pytest.importorskip("scipy.integrate")
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    t = torch.tensor([0.0, 0.3], dtype=F64)
    y, info = odeint(vdp(1e3), y0, t, rtol=1e-6, atol=1e-8, return_info=True)
    ref = scipy.solve_ivp(lambda s, u: [u[1], 1e3 * (1 - u[0] ** 2) * u[1] - u[0]], (0, 0.3),
                          [2.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14).y[:, -1]
    assert info.steps > 100
    assert float((y[-1] - torch.tensor(ref, dtype=F64)).abs().max()) < 1e-5


# ------------------------------------------------------------------------ options

def test_step_size_grid_and_interpolation():
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.25, 0.7], dtype=F64)
    y, info = odeint(linear, y0, t, method="rk4", options={"step_size": 0.1},
                     return_info=True)
    grid = info.grid
    assert grid.shape[0] == 8 and float(grid[-1]) == 0.7  # 0, 0.1, ..., 0.6, 0.7
    fine = rk_reference(linear, y0, grid, "rk4")
    torch.testing.assert_close(y[0], y0)
    torch.testing.assert_close(y[1], fine[2] + 0.5 * (fine[3] - fine[2]), rtol=0, atol=1e-13)
    torch.testing.assert_close(y[2], fine[-1], rtol=0, atol=1e-13)
    yc = odeint(linear, y0, t, method="rk4", options={"step_size": 0.1, "interp": "cubic"})
    ex = linear_exact(y0, t)
    assert float((yc - ex).abs().max()) < float((y - ex).abs().max())
    g = odeint(linear, y0, t, method="rk4",
               options={"grid_constructor": lambda f, y, tt: torch.linspace(0, 0.7, 8,
                                                                            dtype=F64)})
    assert g.shape == (3, 2)


def test_perturb_evaluates_inside_each_step():
    """A field with a jump at t = 0.5, a grid point: perturb takes the left value at the end
    of the step before it and the right value at the start of the step after it."""
    def f(t, y):
        return torch.where(t < 0.5, torch.ones_like(y), -torch.ones_like(y))

    y0 = torch.zeros(1, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y = odeint(f, y0, t, method="heun2", options={"perturb": True})
    torch.testing.assert_close(y[:, 0], torch.tensor([0.0, 0.5, 0.0], dtype=F64))
    y = odeint(f, y0, t, method="heun2")  # the end of the first step sees -1
    assert float(y[1, 0]) == 0.0


# ------------------------------------------------------------------------ funcs written for td

def test_field_that_does_not_depend_on_y():
    y0 = torch.tensor([[1.0], [2.0]], dtype=F64)
    t = torch.linspace(1, 8, 10, dtype=F64)

    def f(s, y):
        return (-0.1 * torch.exp(-0.1 * s)).expand_as(y)

    want = y0 + (torch.exp(-0.1 * t) - math.exp(-0.1))[:, None, None]
    for method in ["dopri5", "rk4", "trapezoid", "radauIIA3"]:
        y = odeint(f, y0, t, method=method, options=None if method == "dopri5"
                   else {"substeps": 8})
        torch.testing.assert_close(y, want, rtol=0, atol=1e-7 if method == "dopri5" else 1e-5)


def test_python_branch_on_t_is_stepped_point_by_point():
    def f(t, y):
        if t < 0.5:
            return -y
        return -2 * y

    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y, info = odeint(f, y0, t, rtol=1e-9, atol=1e-10, return_info=True)
    assert not info.vectorised and info.solver == "sequential" and "vmap" in info.vmap_error
    e = math.exp
    want = torch.stack([y0, y0 * e(-0.5), y0 * e(-0.5) * e(-1.0)])
    torch.testing.assert_close(y, want, rtol=0, atol=1e-7)
    # a vectorisable func stays vectorised
    _, info = odeint(linear, y0, t, return_info=True)
    assert info.vectorised and info.vmap_error is None


def test_func_that_mixes_batch_rows_is_one_system():
    """torchdiffeq's state is the whole tensor: a func mixing rows (here y @ M over the first
    dim) is solved as one system, not row by row."""
    M = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)

    def f(s, y):  # y (2, 3): rows coupled
        return M @ y

    y0 = torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    t = torch.linspace(0, 1, 4, dtype=F64)
    y, info = odeint(f, y0, t, rtol=1e-10, atol=1e-12, return_info=True)
    assert info.one_system
    want = torch.stack([torch.linalg.matrix_exp(M * s) @ y0 for s in t])
    torch.testing.assert_close(y, want, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------ adjoint, events

def test_odeint_adjoint_call_and_params():
    f = Forced(2)
    y0 = torch.tensor([[0.3, -0.2]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"nn\.Module to specify the adjoint parameters"):
        odeint_adjoint(lambda s, y: -y, y0, t)
    y = odeint_adjoint(f, y0, t, method="rk4", adjoint_method="dopri5")
    ga = torch.autograd.grad(y.sum(), [y0, f.W, f.b])
    gb = torch.autograd.grad(odeint(f, y0, t, method="rk4").sum(), [y0, f.W, f.b])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # only the listed parameters get gradients
    y = odeint_adjoint(f, y0, t, method="rk4", adjoint_params=(f.W,))
    gW, gb_ = torch.autograd.grad(y.sum(), [f.W, f.b], allow_unused=True)
    assert gb_ is None
    torch.testing.assert_close(gW, ga[1], rtol=0, atol=1e-13)


def test_odeint_event_falling_ball():
    """x'' = -g from height x0 at rest: the ground at t* = sqrt(2 x0 / g); dt*/dx0 = 1 /
    sqrt(2 g x0)."""
    g = 9.81
    x0 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    y0 = torch.stack([x0, torch.zeros((), dtype=F64)])

    def f(t, y):
        return torch.stack([y[1], torch.full_like(y[1], -g)])

    for method in ["dopri5", "rk4"]:
        opts = {"step_size": 0.01} if method == "rk4" else None
        t_ev, sol = odeint_event(f, y0, torch.tensor(0.0, dtype=F64),
                                 event_fn=lambda t, y: y[0], method=method, options=opts)
        assert sol.shape == (2, 2)
        assert abs(float(t_ev.detach()) - math.sqrt(2 * 2.0 / g)) < 1e-9
        assert abs(float(sol[1, 0].detach())) < 1e-9
        (d,) = torch.autograd.grad(t_ev, x0)
        assert abs(float(d) - 1 / math.sqrt(2 * g * 2.0)) < 1e-7
    with pytest.raises(ValueError, match=r"requires options=\{'step_size'"):
        odeint_event(f, y0, torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0],
                     method="rk4")
    # through odeint's own event_fn keyword, and in reverse time
    t_ev, sol = odeint(f, y0.detach(), torch.tensor([0.0, 1.0], dtype=F64),
                       event_fn=lambda t, y: y[0])
    assert abs(float(t_ev) - math.sqrt(2 * 2.0 / g)) < 1e-9
    t_ev, _ = odeint_event(lambda t, y: -y, torch.tensor([1.0], dtype=F64),
                           torch.tensor(0.0, dtype=F64), reverse_time=True,
                           event_fn=lambda t, y: y[0] - 2.0)
    assert abs(float(t_ev) + math.log(2.0)) < 1e-8


def test_warnings_do_not_escape_for_a_clean_solve():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(linear, torch.ones(2, dtype=F64), torch.linspace(0, 1, 3, dtype=F64))


def test_a_large_state_defaults_to_stepping():
    """Newton over the grid keeps a (D, D) Jacobian per step: above DENSE_MAX entries the
    default solver steps in time (an explicit method then needs no Jacobian at all)."""
    D = paraseq.ode.api.DENSE_MAX + 1
    W = torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(6)) / D
    y0 = torch.randn(D, dtype=F64, generator=torch.Generator().manual_seed(7))
    t = torch.linspace(0, 0.5, 3, dtype=F64)
    _, info = odeint(lambda s, y: torch.tanh(y @ W.T) - y, y0, t, return_info=True)
    assert info.solver == "sequential" and info.error_ratio <= 1
    _, small = odeint(linear, torch.ones(2, dtype=F64), t, return_info=True)
    assert small.solver == "newton"
