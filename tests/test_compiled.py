"""The compiled GRU loop (paraseq.cells.compiled) against the torch cell equations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paraseq.cells import compiled
from paraseq.cells import functional as CF

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")


def _loop(gi, h0, w, b):
    h, out = h0, []
    for t in range(gi.shape[1]):
        h = CF._gru_gated(gi[:, t], h, w, b)[0]
        out.append(h)
    return torch.stack(out, 1)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), T=st.sampled_from([1, 2, 17, 60]), H=st.integers(1, 6),
       diag=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 999))
def test_matches_the_cell_loop_forward_and_backward(B, T, H, diag, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gi = torch.randn(B, T, 3 * H, generator=g, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=dtype, requires_grad=True)
    w = (0.6 * torch.randn(3 * H, *(() if diag else (H,)), generator=g, dtype=dtype))
    w.requires_grad_()
    b = torch.randn(3 * H, generator=g, dtype=dtype, requires_grad=True) if bias else None
    out = compiled.gru_sequence(gi, h0, w, b)
    ref = _loop(gi, h0, w, b)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert out.dtype == dtype and out.shape == (B, T, H)
    assert (out - ref).abs().max() <= tol
    wt = torch.randn(out.shape, generator=g, dtype=dtype)
    leaves = [gi, h0, w] + ([b] if bias else [])
    g1 = torch.autograd.grad((out * wt).sum(), leaves)
    g2 = torch.autograd.grad((ref * wt).sum(), leaves)
    for a, c in zip(g1, g2, strict=True):
        assert (a - c).abs().max() <= (1e-11 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("diag", [False, True])
def test_gradcheck(diag):
    g = torch.Generator().manual_seed(0)
    gi = torch.randn(2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, *(() if diag else (3,)), generator=g, dtype=torch.float64)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compiled.gru_sequence, (gi, h0, w.requires_grad_(), b))


def test_supported_only_on_cpu_float32_float64():
    assert compiled.supported(torch.zeros(1))
    assert compiled.supported(torch.zeros(1, dtype=torch.float64))
    assert not compiled.supported(torch.zeros(1, dtype=torch.bfloat16))


def test_fast_tanh_is_within_4e7_of_tanh_in_float32():
    import numpy as np

    xs = np.linspace(-12.0, 12.0, 24001).astype(np.float32)
    got = np.array([compiled._fast_tanh(np.float32(x)) for x in xs], dtype=np.float32)
    assert np.abs(got.astype(np.float64) - np.tanh(xs.astype(np.float64))).max() < 4e-7
    assert compiled._fast_tanh(np.float32(0.0)) == 0.0
