"""The diagonal cells' compiled Newton sweep (``paraseq.cells.compiled.diag`` through
``paraseq.cells.newton``) against a float64 loop written here, and as the parallel path of
``paraseq.nn.DiagGRU`` / ``DiagLSTM``.

Both vector layouts are exercised (batch contiguous, memory (K, T, B); units contiguous,
(T, B, K) or (B, T, K)), batch and hidden sizes that are not multiples of the SIMD width,
lengths that are not powers of two, both dtypes, exact Newton and the LSTM's diagonal
quasi-Newton. What is checked: the trajectory (float64 to 1e-10 of the loop, float32 to a few
1e-6), the reported residual against one recomputed here, gradients (gradcheck; against
autograd through the loop), nan inputs (never converged; the fallback's nan pattern is the
loop's), the thread split, and the modules' paths and results.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paraseq import ConvergenceError
from paraseq.cells import compiled, newton
from paraseq.nn import DiagGRU, DiagLSTM

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")

CELLS = {"gru": compiled._GRU, "lstm": compiled._LSTM}
GATES = {"gru": 3, "lstm": 4}
TOLS = {torch.float64: (1e-14, 1e-12), torch.float32: (1e-7, 1e-6)}


def _step(cell, x, state, w, b):
    """One step of the diagonal-recurrence cell (w (K,) used elementwise), written out here."""
    if cell == "lstm":
        h, c = state
        g = x + torch.cat([h] * 4, -1) * w + b
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        return torch.sigmoid(o) * torch.tanh(c), c
    h = state
    y = torch.cat([h] * 3, -1) * w + b
    H = h.shape[-1]
    r = torch.sigmoid(x[..., :H] + y[..., :H])
    z = torch.sigmoid(x[..., H:2 * H] + y[..., H:2 * H])
    n = torch.tanh(x[..., 2 * H:] + r * y[..., 2 * H:])
    return (1 - z) * n + z * h


def _loop(cell, gi, h0, w, b, c0=None):
    state, out = ((h0, c0) if cell == "lstm" else h0), []
    for t in range(gi.shape[1]):
        state = _step(cell, gi[:, t], state, w, b)
        out.append(state)
    if cell == "lstm":
        return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)
    return torch.stack(out, 1)


def _residual(cell, gi, h0, w, b, S, c0=None):
    """max_t |s_t - f(s_{t-1})| / (1 + |f|) in float64 (the LSTM: over h and c)."""
    gi, h0, w, b = (t.double() for t in (gi, h0, w, b))
    if cell == "lstm":
        Hh, Hc = (t.double() for t in S)
        prev = (torch.cat([h0.unsqueeze(1), Hh[:, :-1]], 1),
                torch.cat([c0.double().unsqueeze(1), Hc[:, :-1]], 1))
        Fh, Fc = _step(cell, gi, prev, w, b)
        return max(float(((Hh - Fh).abs() / (1 + Fh.abs())).max()),
                   float(((Hc - Fc).abs() / (1 + Fc.abs())).max()))
    S = S.double()
    F = _step(cell, gi, torch.cat([h0.unsqueeze(1), S[:, :-1]], 1), w, b)
    return float(((S - F).abs() / (1 + F.abs())).max())


def _problem(cell, B, T, H, dtype, seed, layout="BTK", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    K = GATES[cell] * H
    gi = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    h0 = 0.5 * torch.randn(B, H, generator=g, dtype=torch.float64)
    w = scale * torch.randn(K, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    c0 = 0.5 * torch.randn(B, H, generator=g, dtype=torch.float64) if cell == "lstm" else None
    if layout == "TBK":
        gi = gi.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "KTB":
        gi = gi.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    return (*(t.to(dtype) for t in (gi, h0, w, b)), None if c0 is None else c0.to(dtype))


def _solve(cell, gi, h0, w, b, c0=None, method="newton", max_iter=100, on_failure="fallback"):
    target, accept = TOLS[gi.dtype]
    return newton.newton_sequence(CELLS[cell], gi, h0, w, b, target=target, accept=accept,
                                  max_iter=max_iter, on_failure=on_failure, c0=c0,
                                  method=method)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cell=st.sampled_from(sorted(CELLS)), method=st.sampled_from(["newton", "quasi_newton"]),
       B=st.integers(1, 37), T=st.integers(1, 300), H=st.integers(1, 40),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["BTK", "TBK", "KTB"]), seed=st.integers(0, 1000))
def test_sweeps_match_the_loop(cell, method, B, T, H, dtype, layout, seed):
    gi, h0, w, b, c0 = _problem(cell, B, T, H, dtype, seed, layout)
    c64 = None if c0 is None else c0.double()
    ref = _loop(cell, *(t.double() for t in (gi, h0, w, b)), c0=c64)
    S, info = _solve(cell, gi, h0, w, b, c0, method)
    assert info.converged and not info.fell_back, info
    assert info.method == method and info.jacobian == "analytic (compiled sweep)"
    for got, want in zip(*((S, ref) if cell == "lstm" else ((S,), (ref,))), strict=True):
        assert got.shape == (B, T, H) and got.dtype == dtype
        err = float((got.double() - want).abs().max())
        assert err <= (1e-10 if dtype == torch.float64 else 2e-5), (err, info)
    true = _residual(cell, gi, h0, w, b, S, c0)
    assert true <= info.residual + (4e-7 if dtype == torch.float32 else 1e-14)
    assert info.residual <= TOLS[dtype][1]
    assert len(info.residuals) == info.iterations + 1
    if method == "newton" or cell == "gru":  # exact Newton: a handful
        assert info.iterations <= 12, info.residuals


def test_exact_newton_is_quadratic_where_the_diagonal_lstm_is_not():
    """DiagLSTM's exact Newton (its 2 x 2 blocks) takes a handful of sweeps; the diagonal
    quasi-Newton (the blocks' off-diagonal cut) converges linearly, so takes more."""
    gi, h0, w, b, c0 = _problem("lstm", 8, 400, 6, torch.float64, 7)
    _, exact = _solve("lstm", gi, h0, w, b, c0, "newton")
    _, quasi = _solve("lstm", gi, h0, w, b, c0, "quasi_newton")
    assert exact.converged and quasi.converged
    assert exact.iterations <= 8 < quasi.iterations, (exact.residuals, quasi.residuals)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_threads_agree(cell, monkeypatch):
    """Groups split across threads give the single thread's result exactly."""
    gi, h0, w, b, c0 = _problem(cell, 21, 500, 9, torch.float64, 3, "KTB")
    one, i1 = _solve(cell, gi, h0, w, b, c0)
    monkeypatch.setattr(newton, "DIAG_SPLIT_MIN", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two, i2 = _solve(cell, gi, h0, w, b, c0)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(*((one, two) if cell == "lstm" else ((one,), (two,))), strict=True):
        assert torch.equal(a, c)
    assert i1.residuals == i2.residuals


@pytest.mark.parametrize("cell,method", [("gru", "newton"), ("lstm", "newton"),
                                         ("lstm", "quasi_newton")])
def test_gradcheck(cell, method):
    gi, h0, w, b, c0 = _problem(cell, 3, 9, 2, torch.float64, 11)
    args = [t.clone().requires_grad_() for t in (gi, h0, w, b)]
    if c0 is None:
        torch.autograd.gradcheck(lambda *a: _solve(cell, *a, method=method)[0], args)
    else:
        torch.autograd.gradcheck(
            lambda gi, h0, w, b, c0: _solve(cell, gi, h0, w, b, c0, method)[0],
            [*args, c0.clone().requires_grad_()])


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("layout", ["BTK", "KTB"])
def test_gradients_match_autograd_through_the_loop(cell, layout):
    gi, h0, w, b, c0 = _problem(cell, 19, 120, 5, torch.float64, 13, layout)
    tensors = (gi, h0, w, b) if c0 is None else (gi, h0, w, b, c0)
    args = [t.clone().requires_grad_() for t in tensors]
    ref_args = [t.detach().clone().requires_grad_() for t in tensors]
    up = torch.randn(19, 120, 5, dtype=torch.float64)
    upc = torch.randn(19, 120, 5, dtype=torch.float64)

    def loss(out):
        return (out[0] * up + out[1] * upc).sum() if cell == "lstm" else (out * up).sum()

    g = torch.autograd.grad(loss(_solve(cell, *args[:4], *args[4:])[0]), args)
    gr = torch.autograd.grad(loss(_loop(cell, *ref_args[:4], *ref_args[4:])), ref_args)
    for a, r in zip(g, gr, strict=True):
        assert float((a - r).abs().max()) < 1e-9


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_nan_input_is_never_converged(cell):
    """A nan in gi makes that unit's later states nan in the loop (and only that unit's: the
    recurrence is diagonal). The sweeps never call it converged; the fallback's result has
    nan exactly where the loop does."""
    gi, h0, w, b, c0 = _problem(cell, 3, 50, 4, torch.float64, 19)
    gi[1, 20, 2] = float("nan")
    ref = _loop(cell, gi, h0, w, b, c0)
    S, info = _solve(cell, gi, h0, w, b, c0)
    assert not info.converged and info.fell_back and info.fallback_from <= 20
    for got, want in zip(*((S, ref) if cell == "lstm" else ((S,), (ref,))), strict=True):
        assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
        ok = ~want.isnan()
        assert float((got[ok] - want[ok]).abs().max()) < 1e-10
    with pytest.raises(ConvergenceError, match="method='newton'"):
        _solve(cell, gi, h0, w, b, c0, on_failure="raise")


def test_bad_arguments():
    gi, h0, w, b, _ = _problem("gru", 2, 5, 3, torch.float64, 1)
    with pytest.raises(ValueError, match="method must be 'newton'"):
        _solve("gru", gi, h0, w.repeat(3, 1)[:, :3], b, method="quasi_newton")
    with pytest.raises(ValueError, match="method must be 'newton'"):
        _solve("gru", gi, h0, w, b, method="picard")
    with pytest.raises(ValueError, match="Elman cells take"):
        newton.newton_sequence(compiled._ELMAN_TANH, gi[..., :3], h0, w[:3], b[:3],
                               target=1e-14, accept=1e-12, max_iter=5, on_failure="raise")


def test_short_sequences():
    for T in (1, 2):
        for cell in CELLS:
            gi, h0, w, b, c0 = _problem(cell, 2, T, 3, torch.float64, 23)
            S, info = _solve(cell, gi, h0, w, b, c0)
            ref = _loop(cell, gi, h0, w, b, c0)
            got, want = (S[0], ref[0]) if cell == "lstm" else (S, ref)
            assert float((got - want).abs().max()) < 1e-12 and info.converged


# ----------------------------------------------------------------------------- the modules


@pytest.mark.parametrize("cls,method", [(DiagGRU, "quasi_newton"), (DiagGRU, "newton"),
                                        (DiagLSTM, "newton"), (DiagLSTM, "quasi_newton")])
@pytest.mark.parametrize("B,H", [(16, 2), (3, 20)])  # input_projection's two layouts
def test_modules_forced_parallel_run_the_sweep(cls, method, B, H):
    """The forced parallel methods of DiagGRU/DiagLSTM run the compiled sweep and equal the
    module's compiled loop, outputs and gradients (float64, 2 layers, bidirectional)."""
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64)
    m = cls(5, H, method=method, **kw)
    ref = cls(5, H, method="sequential", **kw)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(90, B, 5, dtype=torch.float64, requires_grad=True)
    y, y_ref = m(x)[0], ref(x)[0]
    assert m.last_path == f"parallel ({method})" and ref.last_path == "compiled loop"
    assert all(i.jacobian == "analytic (compiled sweep)" and i.method == method
               and i.converged for i in m.last_solve_info)
    assert float((y - y_ref).detach().abs().max()) < 1e-12
    up = torch.randn_like(y)
    g = torch.autograd.grad((y * up).sum(), [x, *m.parameters()])
    g_ref = torch.autograd.grad((y_ref * up).sum(), [x, *ref.parameters()])
    for a, r in zip(g, g_ref, strict=True):
        assert float((a - r).abs().max()) < 1e-10 * (1 + float(r.abs().max()))


def test_module_float32_and_the_generic_path_agree(monkeypatch):
    """float32: the sweep's result is within float32 rounding of the float64 loop, as the
    generic solver's (NEWTON_SWEEPS off) is."""
    from paraseq.nn import rnn

    torch.manual_seed(1)
    m = DiagGRU(4, 12, method="quasi_newton")
    x = torch.randn(120, 5, 4)
    with torch.no_grad():
        y = m(x)[0]
        m64 = DiagGRU(4, 12, method="sequential", dtype=torch.float64)
        m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        want = m64(x.double())[0]
        monkeypatch.setattr(rnn, "NEWTON_SWEEPS", False)
        generic = m(x)[0]
    assert m.last_solve_info[0].jacobian != "analytic (compiled sweep)"
    assert float((y.double() - want).abs().max()) < 2e-6
    assert float((generic.double() - want).abs().max()) < 2e-6
    assert math.isfinite(float(y.sum()))
