"""Newton as compiled sweeps (paraseq.cells.newton) against a float64 loop written here.

Both kernels are exercised (the batch size decides: lanes from W rows on, rows below), batch
sizes that are not multiples of the SIMD width, lengths that are not powers of two, the three
cells, both dtypes, strided gi. What is checked: the trajectory (float64: to 1e-10 of the loop;
float32: to a few 1e-6), the reported residual against one recomputed here from the result (it
may only over-state it: the converged prefix the sweeps skip keeps its earlier, valid,
residuals), the iteration count (Newton on these contractive cells: a handful), the gradients
(gradcheck, and against autograd through the loop), and the failure paths.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paraseq import ConvergenceError
from paraseq.cells import compiled, newton

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")

CELLS = {"gru": compiled._GRU, "tanh": compiled._ELMAN_TANH, "relu": compiled._ELMAN_RELU,
         "lstm": compiled._LSTM}
GATES = {"gru": 3, "tanh": 1, "relu": 1, "lstm": 4}


def _step(cell: str, x: torch.Tensor, h, w: torch.Tensor, b: torch.Tensor):
    """One step of the cell from torch's equations, written out here (the LSTM's state is the
    pair (h, c))."""
    if cell == "lstm":
        h, c = h
        g = x + h @ w.t() + b
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        return torch.sigmoid(o) * torch.tanh(c), c
    g = h @ w.t() + b
    if cell == "gru":
        H = h.shape[-1]
        r = torch.sigmoid(x[..., :H] + g[..., :H])
        z = torch.sigmoid(x[..., H:2 * H] + g[..., H:2 * H])
        n = torch.tanh(x[..., 2 * H:] + r * g[..., 2 * H:])
        return (1 - z) * n + z * h
    return torch.tanh(x + g) if cell == "tanh" else torch.relu(x + g)


def _loop(cell, gi, h0, w, b, c0=None):
    """The states (B, T, H) step by step; the LSTM's (h, c)."""
    h, out = (h0, c0) if cell == "lstm" else h0, []
    for t in range(gi.shape[1]):
        h = _step(cell, gi[:, t], h, w, b)
        out.append(h)
    if cell == "lstm":
        return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)
    return torch.stack(out, 1)


def _residual(cell, gi, h0, w, b, H, c0=None):
    """max_t |s_t - f(s_{t-1})| / (1 + |f|) of a trajectory, in float64 (the LSTM: over h and
    c)."""
    gi, h0, w, b = (t.double() for t in (gi, h0, w, b))
    if cell == "lstm":
        Hh, Hc = (t.double() for t in H)
        prev = (torch.cat([h0.unsqueeze(1), Hh[:, :-1]], 1),
                torch.cat([c0.double().unsqueeze(1), Hc[:, :-1]], 1))
        Fh, Fc = _step(cell, gi, prev, w, b)
        return max(float(((Hh - Fh).abs() / (1 + Fh.abs())).max()),
                   float(((Hc - Fc).abs() / (1 + Fc.abs())).max()))
    H = H.double()
    prev = torch.cat([h0.unsqueeze(1), H[:, :-1]], 1)
    F = _step(cell, gi, prev, w, b)
    return float(((H - F).abs() / (1 + F.abs())).max())


def _problem(cell, B, T, Hs, dtype, seed, scale=1.0):
    """(gi, h0, w, b, c0): c0 for the LSTM, None otherwise."""
    g = torch.Generator().manual_seed(seed)
    K = GATES[cell] * Hs
    gi = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(B, Hs, generator=g, dtype=torch.float64)
    w = scale * torch.randn(K, Hs, generator=g, dtype=torch.float64) / math.sqrt(Hs)
    b = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    c0 = 0.5 * torch.randn(B, Hs, generator=g, dtype=torch.float64) if cell == "lstm" else None
    return (*(t.to(dtype) for t in (gi, h0, w, b)), None if c0 is None else c0.to(dtype))


TOLS = {torch.float64: (1e-14, 1e-12), torch.float32: (1e-7, 1e-6)}


def _solve(cell, gi, h0, w, b, c0=None, max_iter=60, on_failure="fallback", tols=None,
           stats=None):
    target, accept = tols or TOLS[gi.dtype]
    return newton.newton_sequence(CELLS[cell], gi, h0, w, b, target=target, accept=accept,
                                  max_iter=max_iter, on_failure=on_failure, c0=c0, stats=stats)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cell=st.sampled_from(sorted(CELLS)), B=st.integers(1, 37), T=st.integers(1, 300),
       Hs=st.integers(1, 20), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["BTK", "TBK", "KTB"]), seed=st.integers(0, 1000))
def test_sweeps_match_the_loop(cell, B, T, Hs, dtype, layout, seed):
    # contractive weights: the loop itself is then well conditioned (an expanding relu RNN
    # overflows, and its float32 loop is no reference; see test_failure_policies)
    gi, h0, w, b, c0 = _problem(cell, B, T, Hs, dtype, seed, scale=0.4)
    if layout == "TBK":
        gi = gi.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "KTB":
        gi = gi.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    c64 = None if c0 is None else c0.double()
    ref = _loop(cell, *(t.double() for t in (gi, h0, w, b)), c0=c64)
    H, info = _solve(cell, gi, h0, w, b, c0)
    assert info.converged and not info.fell_back, info
    Hs_, refs = (H, ref) if cell == "lstm" else ((H,), (ref,))
    for got, want in zip(Hs_, refs, strict=True):
        assert got.shape == (B, T, Hs) and got.dtype == dtype
        err = float((got.double() - want).abs().max())
        assert err <= (1e-10 if dtype == torch.float64 else 2e-5), (err, info)
    true = _residual(cell, gi, h0, w, b, H, c0)  # in float64: the kernel's own rounding aside
    assert true <= info.residual + (4e-7 if dtype == torch.float32 else 1e-14), \
        (true, info.residual)
    assert info.residual <= TOLS[dtype][1]
    assert len(info.residuals) == info.iterations + 1
    assert info.iterations <= 12, info.residuals  # Newton on a contractive cell


def test_both_kernels_and_threads_agree():
    """A batch the lanes kernel splits across threads (many groups, long T) and the rows
    kernel (B < W) on the same rows give the loop's trajectory."""
    gi, h0, w, b, _ = _problem("gru", 130, 2000, 4, torch.float64, 3)
    ref = _loop("gru", gi, h0, w, b)
    assert compiled._plan(130, 2000, 4, 4, 12, torch.float64)[0] == "lanes"
    H, info = _solve("gru", gi, h0, w, b)
    assert float((H - ref).abs().max()) < 1e-10 and info.converged
    H1, _ = _solve("gru", gi[:3], h0[:3], w, b)
    assert compiled._plan(3, 2000, 4, 4, 12, torch.float64)[0] == "rows"
    assert float((H1 - ref[:3]).abs().max()) < 1e-10


def test_the_prefix_skip_leaves_converged_steps_alone():
    """Newton converges from the left: after a few sweeps the early steps are done, and later
    sweeps start at the first step above target. Here, with a slowly mixing GRU, the later
    sweeps skip a growing prefix, and the result still holds its residual on every step and
    equals the loop."""
    gi, h0, w, b, _ = _problem("gru", 4, 3000, 6, torch.float64, 5, scale=2.5)
    stats: dict = {}
    H, info = _solve("gru", gi, h0, w, b, stats=stats)
    starts = stats["starts"]
    assert len(starts) == info.iterations and starts[0] == 0
    assert starts == sorted(starts) and starts[-1] > 1000, starts
    assert info.converged and _residual("gru", gi, h0, w, b, H) <= info.residual + 1e-14
    assert float((H - _loop("gru", gi, h0, w, b)).abs().max()) < 1e-10


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_gradcheck(cell):
    gi, h0, w, b, c0 = _problem(cell, 3, 9, 2, torch.float64, 11)
    if cell == "relu":
        gi = gi + 0.5  # keep pre-activations away from relu's kink
    args = [t.clone().requires_grad_() for t in (gi, h0, w, b)]
    if c0 is None:
        torch.autograd.gradcheck(lambda *a: _solve(cell, *a)[0], args)
    else:
        torch.autograd.gradcheck(lambda gi, h0, w, b, c0: _solve(cell, gi, h0, w, b, c0)[0],
                                 [*args, c0.clone().requires_grad_()])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("B", [2, 20])  # rows and lanes
def test_gradients_match_autograd_through_the_loop(cell, B):
    gi, h0, w, b, c0 = _problem(cell, B, 150, 5, torch.float64, 13)
    tensors = (gi, h0, w, b) if c0 is None else (gi, h0, w, b, c0)
    args = [t.clone().requires_grad_() for t in tensors]
    ref_args = [t.clone().requires_grad_() for t in tensors]
    up = torch.randn(B, 150, 5, dtype=torch.float64)
    upc = torch.randn(B, 150, 5, dtype=torch.float64)

    def loss(out):
        return (out[0] * up + out[1] * upc).sum() if cell == "lstm" else (out * up).sum()

    g = torch.autograd.grad(loss(_solve(cell, *args[:4], *args[4:])[0]), args)
    gr = torch.autograd.grad(loss(_loop(cell, *ref_args[:4], *ref_args[4:])), ref_args)
    for a, r in zip(g, gr, strict=True):
        assert float((a - r).abs().max()) < 1e-9


def test_failure_policies():
    """One sweep cannot converge a long expanding problem: fallback finishes with the
    compiled loop from the first step above target (and equals the loop), raise raises
    ConvergenceError with the info, warn returns the iterate with a RuntimeWarning."""
    gi, h0, w, b, _ = _problem("tanh", 5, 400, 8, torch.float64, 17, scale=2.5)
    ref = _loop("tanh", gi, h0, w, b)
    H, info = _solve("tanh", gi, h0, w, b, max_iter=1)
    assert info.fell_back and not info.converged and info.iterations == 1
    assert 0 <= info.fallback_from < 400
    # this tanh RNN expands (chaotic): the compiled loop's and torch's roundings drift apart
    assert float((H - ref).abs().max()) < 1e-7
    with pytest.raises(ConvergenceError) as exc:
        _solve("tanh", gi, h0, w, b, max_iter=1, on_failure="raise")
    assert exc.value.info.iterations == 1 and exc.value.residual > 1e-12
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        H2, info2 = _solve("tanh", gi, h0, w, b, max_iter=1, on_failure="warn")
    assert any(issubclass(r.category, RuntimeWarning) for r in rec)
    assert not info2.converged and not info2.fell_back
    assert _residual("tanh", gi, h0, w, b, H2) > 1e-12  # the iterate, not the solution


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_nan_input_is_never_converged(cell):
    """A nan in gi makes every later state nan in the loop. The sweeps must not call that
    converged; the fallback's result has nan exactly where the loop does."""
    gi, h0, w, b, c0 = _problem(cell, 3, 50, 4, torch.float64, 19)
    gi[1, 20, 2] = float("nan")
    ref = _loop(cell, gi, h0, w, b, c0)
    H, info = _solve(cell, gi, h0, w, b, c0)
    assert not info.converged and info.fell_back and info.fallback_from <= 20
    for got, want in zip(*((H, ref) if cell == "lstm" else ((H,), (ref,))), strict=True):
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert float((got[ok] - want[ok]).abs().max()) < 1e-10
    with pytest.raises(ConvergenceError):
        _solve(cell, gi, h0, w, b, c0, on_failure="raise")


def test_c0_goes_with_the_lstm_only():
    gi, h0, w, b, _ = _problem("gru", 2, 5, 3, torch.float64, 1)
    with pytest.raises(ValueError, match="c0 is the LSTM's initial cell state"):
        _solve("gru", gi, h0, w, b, h0)
    gi, h0, w, b, _ = _problem("lstm", 2, 5, 3, torch.float64, 1)
    with pytest.raises(ValueError, match="c0 is the LSTM's initial cell state"):
        _solve("lstm", gi, h0, w, b)


def test_an_empty_sweep_range_and_short_sequences():
    for T in (1, 2):
        gi, h0, w, b, _ = _problem("gru", 2, T, 3, torch.float64, 23)
        H, info = _solve("gru", gi, h0, w, b)
        assert float((H - _loop("gru", gi, h0, w, b)).abs().max()) < 1e-12
        assert info.converged and info.iterations <= 2
