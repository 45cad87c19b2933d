"""Never silently wrong (issue 12): non-finite values keep the loop's pattern on every
linear_scan backend and solve method, higher-order gradients through solve_recurrence,
degenerate shapes, inference mode, and cells that break the contract.

Shape letters: B batch, T time, n input size, D state size.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

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
                                st.sampled_from(SPECIAL + [0.0])), min_size=1, max_size=4),
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
