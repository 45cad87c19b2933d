"""Never silently wrong (issue 12): non-finite values keep the loop's pattern on every
linear_scan backend and solve method, higher-order gradients through solve_recurrence,
degenerate shapes, inference mode, and cells that break the contract.

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradgradcheck

import paraseq
from paraseq.scan import BACKENDS
from paraseq.solve import api as solve_api

F64 = torch.float64
SCANS = [name for name, b in BACKENDS.items() if b.is_available()
         and (name != "triton" or torch.cuda.is_available())]
PARALLEL = ["newton", "quasi_newton", "damped_newton", "picard", "jacobi"]
METHODS = ["sequential", *PARALLEL, "auto"]
SPECIAL = [math.nan, math.inf, -math.inf]


def same_pattern(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-9) -> None:
    """nan where the loop has nan, +-inf where it has +-inf, and close finite values."""
    assert torch.equal(got.isnan(), want.isnan()), "nan positions differ from the loop's"
    assert torch.equal(got.isinf(), want.isinf()), "inf positions differ from the loop's"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), "signs of inf differ from the loop's"
    fin = torch.isfinite(want)
    if fin.any():
        err = ((got[fin] - want[fin]).abs() / (1 + want[fin].abs())).max().item()
        assert err <= tol, err


# ------------------------------------------------------------- linear_scan: nan and inf

def test_scan_nan_in_first_coefficient_without_x0():
    # the case: the loop gives 0 * nan = nan at the first step, and so nan after
    a = torch.full((1, 40, 1), 0.5)
    a[0, 0, 0] = math.nan
    b = torch.ones(1, 40, 1)
    ar = a.flip(1)
    for backend in SCANS:
        assert paraseq.linear_scan(a, b, backend=backend).isnan().all(), backend
        assert paraseq.linear_scan(ar, b, backend=backend, reverse=True).isnan().all(), backend


def test_scan_inf_times_zero_coefficient_product():
    # a_1 = 0 then a_2 = inf: the loop's x_2 = inf * x_1 + b_2 is +inf, while the tree's
    # product of coefficients a_2 a_1 = inf * 0 = nan turns it into nan
    a = torch.full((2, 64, 3), 0.5, dtype=F64)
    a[:, 0] = 0.0
    a[:, 1] = math.inf
    b = torch.ones(2, 64, 3, dtype=F64)
    x0 = torch.zeros(2, 3, dtype=F64)
    want = paraseq.linear_scan(a, b, x0, backend="sequential")
    assert want.isinf().any()
    for backend in SCANS:
        same_pattern(paraseq.linear_scan(a, b, x0, backend=backend), want)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(backend=st.sampled_from(SCANS), dense=st.booleans(), reverse=st.booleans(),
       with_x0=st.booleans(), T=st.integers(1, 80), D=st.integers(1, 3), B=st.integers(1, 3),
       spots=st.lists(st.tuples(st.sampled_from("abx"), st.integers(0, 10 ** 6),
                                st.sampled_from([*SPECIAL, 0.0])), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_scan_nonfinite_pattern_matches_loop(backend, dense, reverse, with_x0, T, D, B, spots,
                                             seed):
    g = torch.Generator().manual_seed(seed)
    shape_a = (B, T, D, D) if dense else (B, T, D)
    a = (torch.rand(shape_a, generator=g, dtype=F64) * 2 - 1) * (0.9 / D if dense else 1.1)
    b = torch.randn(B, T, D, generator=g, dtype=F64)
    x0 = torch.randn(B, D, generator=g, dtype=F64) if with_x0 else None
    for where, pos, value in spots:  # a value (nan, inf, -inf or an exact zero) somewhere
        t = {"a": a, "b": b, "x": x0}[where]
        if t is None:
            continue
        t.view(-1)[pos % t.numel()] = value
    want = paraseq.linear_scan(a, b, x0, reverse=reverse, backend="sequential",
                               structure="dense" if dense else "diagonal")
    got = paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend,
                              structure="dense" if dense else "diagonal")
    same_pattern(got, want)


def test_scan_empty_time_keeps_the_graph():
    for dense in (False, True):
        a = torch.rand((2, 0, 3, 3) if dense else (2, 0, 3), dtype=F64, requires_grad=True)
        b = torch.randn(2, 0, 3, dtype=F64, requires_grad=True)
        x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
        x = paraseq.linear_scan(a, b, x0, structure="dense" if dense else "diagonal")
        assert x.shape == (2, 0, 3) and x.requires_grad
        x.sum().backward()
        for t in (a, b, x0):
            assert t.grad is not None and not t.grad.any()


# ------------------------------------------------------------- solve_recurrence

class Tanh(torch.nn.Module):
    """h_t = tanh(W h_{t-1} + U x_t), float64."""

    def __init__(self, n=2, D=3, scale=0.5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, D, generator=g, dtype=F64) * scale / D ** .5)
        self.U = torch.nn.Parameter(torch.randn(D, n, generator=g, dtype=F64))
        self.hidden_size = D

    def forward(self, x, h):
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def loop(cell, x, h0):
    h, out = h0, []
    for t in range(x.shape[-2]):
        h = cell(x[:, t], h)
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "damped_newton"])
def test_unrolled_keeps_the_graph_to_parameters_only(method):
    cell = Tanh()
    x, h0 = torch.randn(2, 6, 2, dtype=F64), torch.randn(2, 3, dtype=F64)
    H = paraseq.solve_recurrence(cell, x, h0, method=method, grad="unrolled", max_iter=6)
    assert H.requires_grad
    (gW,) = torch.autograd.grad((H ** 2).sum(), cell.W)
    (want,) = torch.autograd.grad((loop(cell, x, h0) ** 2).sum(), cell.W)
    assert (gW - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("method", ["newton", "picard"])
def test_unrolled_second_derivatives_match_the_loop(method):
    cell = Tanh()
    x = torch.randn(2, 5, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)

    def penalty(H):
        (gW,) = torch.autograd.grad((H ** 3).sum(), cell.W, create_graph=True)
        return torch.autograd.grad((gW ** 2).sum(), cell.W)[0]

    got = penalty(paraseq.solve_recurrence(cell, x, h0, method=method, grad="unrolled",
                                           max_iter=5))
    assert (got - penalty(loop(cell, x, h0))).abs().max().item() < 1e-9
    kw = dict(method=method, grad="unrolled", max_iter=5)
    assert gradgradcheck(lambda x, h0: paraseq.solve_recurrence(cell, x, h0, **kw), (x, h0))


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "picard"])
def test_implicit_second_derivative_matches_the_loop_and_a_third_is_a_clear_error(method):
    cell = Tanh()
    x = torch.randn(2, 5, 2, dtype=F64, requires_grad=True)
    h0 = torch.zeros(2, 3, dtype=F64)
    H = paraseq.solve_recurrence(cell, x, h0, method=method)
    (gW,) = torch.autograd.grad((H ** 3).sum(), cell.W, create_graph=True)
    Hl = loop(cell, x, h0)
    (want,) = torch.autograd.grad((Hl ** 3).sum(), cell.W, create_graph=True)
    assert (gW - want).abs().max().item() < 1e-9  # first order stays exact
    (g2,) = torch.autograd.grad((gW ** 2).sum(), x, create_graph=True)
    (w2,) = torch.autograd.grad((want ** 2).sum(), x, create_graph=True)
    assert (g2 - w2).abs().max().item() < 1e-8
    with pytest.raises(RuntimeError, match=r"third derivative.*grad='unrolled'"):
        torch.autograd.grad(g2.sum(), cell.W)


def nan_cell(x, h):
    """A cell that returns nan where the input says so (x[:, 1] > 2)."""
    out = torch.tanh(0.5 * h + x[:, :1])
    return torch.where(x[:, 1:2] > 2, torch.full_like(out, math.nan), out)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(METHODS), T=st.integers(1, 90), B=st.integers(1, 2),
       spots=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(SPECIAL)),
                      min_size=1, max_size=3), seed=st.integers(0, 2 ** 16))
def test_solve_nonfinite_pattern_matches_loop(method, T, B, spots, seed):
    g = torch.Generator().manual_seed(seed)
    cell = Tanh(D=2, seed=seed)
    x = torch.randn(B, T, 2, generator=g, dtype=F64)
    for pos, value in spots:
        x.view(-1)[pos % x.numel()] = value
    h0 = torch.randn(B, 2, dtype=F64)
    with torch.no_grad():
        want = loop(cell, x, h0)
        got = paraseq.solve_recurrence(cell, x, h0, method=method)
    same_pattern(got, want, tol=1e-8)


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "picard", "jacobi"])
def test_warn_keeps_the_loops_nan(method):
    x = torch.randn(1, 80, 2, dtype=F64)
    x[0, 30, 1] = 5.0  # the cell returns nan at step 30
    h0 = torch.zeros(1, 1, dtype=F64)
    want = loop(nan_cell, x, h0)
    with pytest.warns(RuntimeWarning, match="nan or inf"):
        got = paraseq.solve_recurrence(nan_cell, x, h0, method=method, on_failure="warn",
                                       max_iter=3)
    same_pattern(got, want, tol=1e-8)


def test_h0_of_another_dtype_is_refused_as_torch_does():
    with pytest.raises(RuntimeError, match="same dtype"):
        paraseq.solve_recurrence(torch.nn.GRUCell(2, 3), torch.randn(1, 4, 2),
                                 torch.zeros(1, 3, dtype=F64))


@pytest.mark.parametrize("method", PARALLEL)
def test_degenerate_shapes(method):
    cell = Tanh()
    H = paraseq.solve_recurrence(cell, torch.randn(0, 100, 2, dtype=F64), method=method)
    assert H.shape == (0, 100, 3)
    x = torch.randn(2, 0, 2, dtype=F64, requires_grad=True)
    H = paraseq.solve_recurrence(cell, x, method=method)
    assert H.shape == (2, 0, 3) and H.requires_grad
    H.sum().backward()
    empty = paraseq.solve_recurrence(lambda u, h: h * u.sum(-1, keepdim=True),
                                     torch.randn(2, 70, 2, dtype=F64),
                                     torch.zeros(2, 0, dtype=F64), method=method)
    assert empty.shape == (2, 70, 0)
    meta = paraseq.solve_recurrence(cell.to("meta"), torch.randn(2, 90, 2, dtype=F64,
                                                                 device="meta"),
                                    method=method)
    assert meta.shape == (2, 90, 3) and meta.device.type == "meta"


@pytest.mark.parametrize("method", ["newton", "quasi_newton", "auto"])
def test_inference_mode(method):
    cell = Tanh()
    x, h0 = torch.randn(2, 100, 2, dtype=F64), torch.randn(2, 3, dtype=F64)
    with torch.inference_mode():
        got = paraseq.solve_recurrence(cell, x, h0, method=method)
    with torch.no_grad():
        want = loop(cell, x, h0)
    assert (got - want).abs().max().item() < 1e-9


def test_in_place_cell_is_named():
    def mutating(x, h):
        h.mul_(0.5)
        return h + x

    for method in ("newton", "picard", "sequential"):
        with pytest.raises(ValueError, match=r"mutating.*in place"):
            paraseq.solve_recurrence(mutating, torch.randn(2, 80, 3), torch.zeros(2, 3),
                                     method=method)


def test_stochastic_and_row_mixing_cells_are_detected():
    drop = torch.nn.Dropout(0.3)
    cell = Tanh()

    def noisy(x, h):
        return drop(cell(x, h))

    def mixing(x, h):  # subtracts the batch mean: rows are not independent
        out = cell(x, h)
        return out - 0.5 * out.mean(0, keepdim=True)

    x, h0 = torch.randn(2, 80, 2, dtype=F64), torch.randn(2, 3, dtype=F64)
    with pytest.warns(RuntimeWarning, match="not deterministic"):
        H, info = paraseq.solve_recurrence(noisy, x, h0, method="newton", return_info=True)
    assert info.method == "sequential"
    with pytest.warns(RuntimeWarning, match="not independent"):
        H, info = paraseq.solve_recurrence(mixing, x, h0, method="newton", return_info=True)
    with torch.no_grad():
        assert (H - loop(mixing, x, h0)).abs().max().item() < 1e-12


def test_cost_of_a_forced_method_is_estimated():
    cell = Tanh(n=4, D=512)
    x = torch.randn(1, 64, 4, dtype=F64)
    with pytest.raises(ValueError, match="on_cost='ignore'"):
        paraseq.solve_recurrence(cell, x, method="newton", on_cost="raise")
    parallel, seq = solve_api.estimate_cost("newton", 1, 64, 512, 4,
                                            solve_api.FlatCell(cell, solve_api.StateLayout(
                                                (512,), False)), torch.device("cpu"))
    assert parallel > 100 * seq
    small = solve_api.estimate_cost("newton", 16, 10_000, 8, 8,
                                    solve_api.FlatCell(torch.nn.GRUCell(8, 8),
                                                       solve_api.StateLayout((8,), False)),
                                    torch.device("cpu"))
    assert small[0] < 100 * small[1]  # an ordinary problem passes


@pytest.mark.parametrize("layer", ["S4D", "S4"])
def test_s4_convolution_stays_causal_with_a_nan_input(layer):
    torch.manual_seed(0)
    m = getattr(paraseq.nn, layer)(4, 8).double()
    u = torch.randn(2, 30, 4, dtype=F64)
    u[0, 10, 1] = math.nan
    y = m(u)
    assert torch.isfinite(y[0, :10]).all() and torch.isfinite(y[1]).all()
    assert y[0, 10:].isnan().any()
    want = m(u, mode="recurrent")
    same_pattern(y, want, tol=1e-8)
