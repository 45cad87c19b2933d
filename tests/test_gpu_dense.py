"""paraseq.gpu.dense: the fused Newton of the dense GRU, Elman (tanh, relu) and LSTM, its Triton
kernel, its pure-torch twin, and the routing of paraseq.nn / solve_recurrence onto it.

Without a GPU the kernel runs through triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), which walks every program's steps in NumPy: the
kernel cases stay tiny (B 1, T 13 or 21, H 3), with 8 steps per program (``STEPS`` patched:
both lengths end inside their last program) and 8-step chunks in the dense scan (two
levels). The reference is the float64 sequential loop of torch's own cells (torch.gru_cell,
rnn_tanh_cell, rnn_relu_cell, lstm_cell, fed gi through an identity input weight), and
autograd through it.

Shape letters: B batch, T time, H hidden size, K gates, D state size (LSTM 2 H).
"""

from __future__ import annotations

import importlib.util
import os
import types
import warnings

import pytest
import torch
from torch.autograd import gradcheck

try:  # a bare GPU machine (benchmarks/gpu.py runs -m cuda there) may lack hypothesis
    from hypothesis import example, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton is imported: it reads the variable then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_compile import compile_for_sm90  # noqa: E402  (tests/: conftest.py puts it on the path)

import paraseq  # noqa: E402
from paraseq import nn as pnn  # noqa: E402
from paraseq.cells import ElmanCell, GRUCell, LSTMCell  # noqa: E402
from paraseq.gpu import dense as gd  # noqa: E402
from paraseq.gpu import dense_twin as twin  # noqa: E402
from paraseq.gpu import routing  # noqa: E402
from paraseq.nn import _paths  # noqa: E402
from paraseq.scan import gpu as scan_gpu  # noqa: E402

TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if CUDA else "cpu")
CELLS = gd.CELLS
TORCH_CELL = {"gru": torch.gru_cell, "rnn_tanh": torch.rnn_tanh_cell,
              "rnn_relu": torch.rnn_relu_cell}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(gd, "STEPS", 8)
    monkeypatch.setattr(scan_gpu, "DENSE_CHUNK", 8)


def problem(cell, B, T, H, dtype=torch.float64, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype).to(DEVICE)

    K = twin.GATES[cell]
    gi, w, b = r(B, T, K * H), r(K * H, H, sc=scale / H ** 0.5), r(K * H, sc=0.1)
    h0 = r(B, H, sc=0.5)
    c0 = r(B, H, sc=0.5) if cell == "lstm" else None
    return gi, h0, c0, w, b


def step(cell, gi_t, state, w, b):
    """torch's own cell, one step, from the pre-activations gi_t (N, K H) (an identity input
    weight): the new h, or (h, c)."""
    eye = torch.eye(gi_t.shape[-1], dtype=gi_t.dtype, device=gi_t.device)
    if cell == "lstm":
        return torch.lstm_cell(gi_t, list(state), eye, w, None, b)
    return TORCH_CELL[cell](gi_t, state, eye, w, None, b)


def loop(cell, gi, h0, c0, w, b):
    """The float64 sequential reference (autograd through it gives the reference gradient)."""
    gi, h0, w, b = (t.double() for t in (gi, h0, w, b))
    state = (h0, c0.double()) if cell == "lstm" else h0
    out = []
    for t in range(gi.shape[1]):
        state = step(cell, gi[:, t], state, w, b)
        out.append(state if cell == "lstm" else (state,))
    parts = tuple(torch.stack(p, 1) for p in zip(*out, strict=True))
    return parts if cell == "lstm" else parts[0]


def true_residual(cell, gi, h0, c0, w, b, states):
    """max_t |s_t - f(s_{t-1})| / (1 + |f|) of a trajectory, by torch's float64 cells over
    all B T rows at once."""
    B, T, KH = gi.shape
    st_ = [s.double() for s in as_tuple(states)]
    s0 = [h0.double()] + ([c0.double()] if c0 is not None else [])
    prev = [torch.cat([a.unsqueeze(1), s[:, :-1]], 1).reshape(B * T, -1)
            for a, s in zip(s0, st_, strict=True)]
    f = as_tuple(step(cell, gi.double().reshape(B * T, KH),
                      tuple(prev) if cell == "lstm" else prev[0], w.double(), b.double()))
    return max(((s.reshape(B * T, -1) - v).abs() / (1 + v.abs())).max().item()
               for s, v in zip(st_, f, strict=True))


def as_tuple(s):
    return tuple(s) if isinstance(s, (tuple, list)) else (s,)


def err(got, want):
    return max((a.double() - b.double()).abs().max().item()
               for a, b in zip(as_tuple(got), as_tuple(want), strict=True))


def grads(states, ins, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((s.double() * torch.randn(s.shape, generator=g, dtype=torch.float64)
                .to(s.device)).sum() for s in as_tuple(states))
    return torch.autograd.grad(loss, ins)


def leaves(cell, gi, h0, c0, w, b):
    """The inputs as leaves: ([gi, h0, w, b] + [c0] for the LSTM, c0 or None)."""
    ins = [t.detach().requires_grad_() for t in (gi, h0, w, b)]
    c = None if c0 is None else c0.detach().requires_grad_()
    return ins + ([c] if c is not None else []), c


def solve(cell, ins, c0, **kw):
    return gd.dense_newton(cell, ins[0], ins[1], ins[2], ins[3], c0, **kw)


# ----------------------------------------------------------------------------- the twin


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize(("B", "T", "H"), [(1, 1, 1), (2, 37, 3), (3, 70, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_twin_matches_torchs_loop(cell, B, T, H, dtype):
    gi, h0, c0, w, b = problem(cell, B, T, H, dtype, seed=T)
    states, info = gd.dense_newton(cell, gi, h0, w, b, c0, backend="torch")
    assert info.converged and not info.fell_back and info.jacobian.endswith("torch twin)")
    assert info.iterations <= 12
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert err(states, loop(cell, gi, h0, c0, w, b)) <= tol
    assert all(s.dtype == dtype and s.shape == (B, T, H) for s in as_tuple(states))


if given is not None:  # the property test needs hypothesis
    @settings(max_examples=20, deadline=None)
    @given(cell=st.sampled_from(CELLS), B=st.integers(1, 3), T=st.integers(1, 120),
           H=st.integers(1, 6), double=st.booleans(), fixed=st.sampled_from([None, 1, 3]),
           seed=st.integers(0, 2 ** 16))
    @example(cell="rnn_relu", B=1, T=111, H=1, double=False, fixed=None, seed=1113)
    def test_twin_property(cell, B, T, H, double, fixed, seed):
        """Any shape and length: the adaptive solve is torch's loop (float64 tight, float32
        loose); a fixed count K reports the residual of the iterate it returns, and after K
        iterations at least the first K steps are exact."""
        dtype = torch.float64 if double else torch.float32
        gi, h0, c0, w, b = problem(cell, B, T, H, dtype, seed=seed)
        ref = loop(cell, gi, h0, c0, w, b)
        states, info = gd.dense_newton(cell, gi, h0, w, b, c0, backend="torch",
                                       iterations=fixed)
        if fixed is None:
            assert info.converged or info.fell_back
            # relative to the states' size: a relu RNN can grow to 1e12 over 111 steps, where
            # float32 holds 7 digits (hypothesis found it: rnn_relu, H 1, T 111, seed 1113)
            scale = 1 + max(float(r.abs().max()) for r in as_tuple(ref))
            assert err(states, ref) <= (1e-9 if double else 1e-4) * scale
            return
        assert info.iterations == fixed
        k = min(fixed, T)
        assert err(tuple(s[:, :k] for s in as_tuple(states)),
                   tuple(r[:, :k] for r in as_tuple(ref))) <= (1e-12 if double else 1e-5)
        true = true_residual(cell, gi, h0, c0, w, b, states)
        assert info.residual == pytest.approx(true, rel=1e-6, abs=1e-12 if double else 2e-6)
        assert info.residuals == [info.residual]


@pytest.mark.parametrize("cell", CELLS)
def test_twin_gradcheck(cell):
    gi, h0, c0, w, b = problem(cell, 1, 6, 2, seed=3)
    ins, c0 = leaves(cell, gi, h0, c0, w, b)

    def fn(*args):
        c = args[4] if cell == "lstm" else None
        out = gd.dense_newton(cell, *args[:4], c, backend="torch", tol=1e-13)[0]
        return out

    assert gradcheck(fn, tuple(ins))


@pytest.mark.parametrize("cell", CELLS)
def test_twin_gradients_are_autograd_through_torchs_loop(cell):
    gi, h0, c0, w, b = problem(cell, 2, 70, 4, seed=5)
    ins, c0 = leaves(cell, gi, h0, c0, w, b)
    got = grads(solve(cell, ins, c0, backend="torch")[0], ins)
    want = grads(loop(cell, ins[0], ins[1], c0, ins[2], ins[3]), ins)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-11)


# ----------------------------------------------------------------------------- the kernel


def _problem_parts(cell, backend, dtype=torch.float64, seed=0, H=3, T=21):
    gi, h0, c0, w, b = problem(cell, 1, T, H, dtype, seed=seed)
    x0 = torch.cat([h0, c0], -1) if cell == "lstm" else h0
    P = gd._Problem(cell, gi, x0, w, b, backend)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, T, P.D, generator=g, dtype=torch.float64).to(P.wd).to(DEVICE)
    gx = torch.randn(1, T, P.D, generator=g, dtype=torch.float64).to(P.wd).to(DEVICE)
    return P, x, gx


@needs_triton
@pytest.mark.parametrize("cell", CELLS)
def test_kernel_modes_match_the_twin(cell, small_tiles):
    """Each of the kernel's modes against its twin function at an iterate that is no
    solution (so that J, rhs, the residual and the first failing step all carry
    information), float64, T = 21 over programs of 8 steps."""
    P, x, g = _problem_parts(cell, "triton", seed=11)
    Pt, _, _ = _problem_parts(cell, "torch", seed=11)
    G = P.project(x)
    tol = 0.5  # some steps above, some below
    J, rhs, r, first = P.linearise(x, G, tol, True)
    tJ, trhs, tr, tfirst = Pt.linearise(x, G, tol, True)
    assert P.backend == "triton"
    torch.testing.assert_close(J, tJ, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rhs, trhs, rtol=1e-13, atol=1e-14)
    assert r.max().item() == pytest.approx(tr.item(), rel=1e-13)
    assert int(first.min()) == int(tfirst) < 21
    _, _, r1, first1 = P.linearise(x, G, tol, False)  # the residual alone
    assert r1.max().item() == pytest.approx(tr.item(), rel=1e-13)
    assert int(first1.min()) == int(tfirst)
    # the adjoint: the scan's terms, the reverse scan, the gate gradients, the GEMMs
    got = P.adjoint(x, g)
    want = Pt.adjoint(x, g)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13)


@needs_triton
@pytest.mark.parametrize("cell", ["gru", "lstm", pytest.param("rnn_tanh", marks=pytest.mark.slow),
                                  pytest.param("rnn_relu", marks=pytest.mark.slow)])
def test_kernel_solve_matches_the_twin_and_torchs_loop(cell, small_tiles):
    """The whole solve, forward (every iterate's residual) and backward, float64 (the Elman
    cells' kernel modes are checked one by one in the default run, their solves in the slow
    one)."""
    gi, h0, c0, w, b = problem(cell, 1, 13, 3, seed=21)  # 2 programs of 8 steps, 2 chunks
    ins, c0 = leaves(cell, gi, h0, c0, w, b)
    out = {}
    for backend in ("triton", "torch"):
        states, info = solve(cell, ins, c0, backend=backend, tol=1e-12)
        out[backend] = (states, info, grads(states, ins))
    (ks, ki, kg), (ts, ti, tg) = out["triton"], out["torch"]
    assert ki.jacobian == "analytic (fused dense, triton kernel)" and ki.converged
    assert ki.iterations == ti.iterations
    for a, c in zip(ki.residuals, ti.residuals, strict=True):
        assert abs(a - c) <= 1e-12 + 1e-9 * c
    assert err(ks, ts) <= 1e-14
    ref = loop(cell, ins[0], ins[1], c0, ins[2], ins[3])
    assert err(ks, ref) <= 1e-11
    want = grads(ref, ins)
    for u, v, x in zip(kg, tg, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(u, x, rtol=1e-10, atol=1e-11)


@needs_triton
def test_kernel_padding_strides_and_fixed_iterations(small_tiles, monkeypatch):
    """float32, H = 5 (a tile of 8, three rows padding), gi a time-major transpose (strided,
    as paraseq.nn hands it over), batch rows walked by one program each (the grid's row
    limit patched to 1), iterations=K fixed: the kernel and the twin reach the same iterate
    and report the same residual, which is the true residual of what is returned."""
    monkeypatch.setattr(gd, "MAX_GRID_ROWS", 1)
    gi, h0, _, w, b = problem("gru", 2, 13, 5, torch.float32, seed=7, scale=1.5)
    gi_t = gi.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, 3 H), strides of (T, B, .)
    res = {}
    for backend in ("triton", "torch"):
        res[backend] = gd.dense_newton("gru", gi_t, h0, w, b, iterations=2, backend=backend)
    (ks, ki), (ts, ti) = res["triton"], res["torch"]
    assert ki.iterations == ti.iterations == 2 and len(ki.residuals) == 1
    assert ki.residual == pytest.approx(ti.residual, rel=1e-4)
    assert ki.residual == pytest.approx(true_residual("gru", gi, h0, None, w, b, ks), rel=1e-3)
    assert err(ks, ts) <= 1e-5
    assert not ki.converged and ki.residual > 1e-3  # two iterations from zero: no solution


@needs_triton
def test_kernel_bfloat16_accumulates_in_float32(small_tiles):
    gi, h0, c0, w, b = problem("lstm", 1, 13, 3, torch.float64, seed=11)
    low = [t.to(torch.bfloat16) for t in (gi, h0, c0, w, b)]
    states, info = gd.dense_newton("lstm", low[0], low[1], low[3], low[4], low[2],
                                   backend="triton")
    assert info.converged and info.tol == gd.default_tol(torch.bfloat16) == 2.0 ** -10
    assert all(s.dtype == torch.bfloat16 for s in states)
    ref = loop("lstm", low[0], low[1], low[2], low[3], low[4])  # float64 on the bf16 inputs
    assert err(states, ref) <= 2e-2  # the bf16 rounding of the outputs (states of order one)


@pytest.mark.parametrize("modes", [[0], pytest.param([1, 2, 3], marks=pytest.mark.slow)])
def test_kernel_compiles_for_the_gpu(modes):
    """What the interpreter cannot check: that triton's GPU compiler takes the kernel (every
    cell and mode, BD 8 to 64) down to a cubin for sm_90, and that the warps chosen per tile
    (``dense.warps``) keep it free of register spills up to BD = 32 (the LSTM's forward mode,
    four weight tiles: up to BD = 16; at 32 it sits at the 255-register limit and spills a
    few dozen bytes a thread)."""
    bds = (16, 32, 64) if modes == [0] else (8, 16, 32, 64)
    got = compile_for_sm90([
        dict(module="paraseq.gpu._dense_kernels", kernel="dense_cell_kernel", dtype="fp32",
             constexprs=dict(CELL=c, K=(3, 1, 1, 4)[c], MODE=m, STEPS=16, BLOCK_D=bd),
             num_warps=gd.warps(bd)) for c in range(4) for m in modes for bd in bds])
    assert len(got) == 4 * len(modes) * len(bds)
    for r in got:
        cell, mode, bd = r["constexprs"]["CELL"], r["constexprs"]["MODE"], r["constexprs"][
            "BLOCK_D"]
        cubin, regs, spill = r["cubin"], r["regs"], r["spill"]
        assert cubin > 0 and regs <= 255
        if bd <= (16 if (cell, mode) == (3, 0) else 32):
            assert spill == 0, (cell, mode, bd, regs, spill)
        elif bd == 32:
            assert spill <= 128, (cell, mode, bd, regs, spill)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_in_float32_with_its_tolerance(dtype):
    gi, h0, _, w, b = problem("gru", 2, 70, 4, torch.float64, seed=13)
    low = [t.to(dtype).requires_grad_() for t in (gi, h0, w, b)]
    states, info = gd.dense_newton("gru", *low, backend="torch")
    assert states.dtype == dtype and info.converged
    assert info.tol == gd.default_tol(dtype)
    gi, h0, w, b = (t.detach() for t in low)
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert err(states, loop("gru", gi, h0, None, w, b)) <= 2 * ulp
    got = torch.autograd.grad(states.float().sum(), low)
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in got)


# ----------------------------------------------------------------------------- failure


def test_failure_modes():
    """An iteration cap below what Newton needs: fallback finishes with the loop from the first
    failing step, raise raises, warn warns and returns the iterate."""
    gi, h0, _, w, b = problem("rnn_tanh", 2, 70, 3, seed=17, scale=4.0)
    ref = loop("rnn_tanh", gi, h0, None, w, b)
    s, info = gd.dense_newton("rnn_tanh", gi, h0, w, b, max_iter=1, tol=1e-12, backend="torch")
    assert info.fell_back and 0 <= info.fallback_from < 70 and not info.converged
    assert err(s, ref) <= 1e-12
    with pytest.raises(paraseq.ConvergenceError, match="residual"):
        gd.dense_newton("rnn_tanh", gi, h0, w, b, max_iter=1, tol=1e-12, on_failure="raise",
                        backend="torch")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = gd.dense_newton("rnn_tanh", gi, h0, w, b, max_iter=1, tol=1e-12,
                                  on_failure="warn", backend="torch")
    assert not info.fell_back and info.residual > 1e-12


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_nan_is_reported_not_passed(cell):
    gi, h0, c0, w, b = problem(cell, 1, 37, 2, seed=19)
    gi[0, 20, 1] = float("nan")
    with pytest.raises(paraseq.ConvergenceError):
        gd.dense_newton(cell, gi, h0, w, b, c0, on_failure="raise", backend="torch")
    s, info = gd.dense_newton(cell, gi, h0, w, b, c0, backend="torch")
    ref = loop(cell, gi, h0, c0, w, b)
    assert info.fell_back and info.fallback_from <= 20 and info.iterations == 1
    for u, v in zip(as_tuple(s), as_tuple(ref), strict=True):  # the reference's identity
        # input weight spreads the nan over step 20's units; the cell itself reaches all of
        # them one step later
        assert u[:, 20].isnan().any() and u[:, 21:].isnan().all() and v[:, 21:].isnan().all()
        assert err(u[:, :20], v[:, :20]) <= 1e-12


def test_bad_input_is_a_clear_error():
    gi, h0, c0, w, b = problem("lstm", 2, 5, 3)
    with pytest.raises(ValueError, match="cell must be one of"):
        gd.dense_newton("elman", gi, h0, w, b, c0)
    with pytest.raises(ValueError, match="needs c0"):
        gd.dense_newton("lstm", gi, h0, w, b)
    with pytest.raises(ValueError, match="c0 is the lstm's"):
        gd.dense_newton("gru", gi[..., :9], h0, w[:9], b[:9], c0)
    with pytest.raises(ValueError, match=r"weight_hh must be \(4 H, H\)"):
        gd.dense_newton("lstm", gi, h0, w[:5], b, c0)
    with pytest.raises(ValueError, match=r"gi must be \(B, T, 12\)"):
        gd.dense_newton("lstm", gi[..., :8], h0, w, b, c0)
    with pytest.raises(ValueError, match=r"bias_hh must have shape \(12,\)"):
        gd.dense_newton("lstm", gi, h0, w, b[:4], c0)
    with pytest.raises(TypeError, match="gi must be float32"):
        gd.dense_newton("lstm", gi.to(torch.int32), h0, w, b, c0)
    with pytest.raises(ValueError, match="not both"):
        gd.dense_newton("lstm", gi, h0, w, b, c0, iterations=2, max_iter=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        gd.dense_newton("lstm", gi, h0, w, b, c0, backend="cuda")
    with pytest.raises(ValueError, match=r"weight_hh is on meta but gi is on"):
        gd.dense_newton("lstm", gi, h0, w.to("meta"), b, c0)


def test_the_state_size_bounds_the_kernels(monkeypatch):
    """D <= DENSE_MAX_D: GRU/Elman hidden 64, LSTM hidden 32. backend="triton" beyond is an
    error naming the sizes; "auto" runs the twin there."""
    assert gd.fits("gru", 64) and not gd.fits("gru", 65)
    assert gd.fits("lstm", 32) and not gd.fits("lstm", 33)
    monkeypatch.setattr(scan_gpu, "triton_available", lambda device=None: True)
    assert gd.backend_for(torch.device("cuda"), "auto", 64) == "triton"
    assert gd.backend_for(torch.device("cuda"), "auto", 66) == "torch"
    with pytest.raises(ValueError, match="state size D = 66 is above the kernels' 64"):
        gd.backend_for(torch.device("cuda"), "triton", 66)


def test_missing_triton_means_the_twin(monkeypatch):
    monkeypatch.setattr(scan_gpu, "AVAILABLE", False)
    assert gd.backend_for(torch.device("cuda")) == "torch"
    assert routing.label(torch.device("cuda"), dense_cell=True) == "fused newton (torch twin)"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run.*pip install triton"):
        gd.backend_for(torch.device("cpu"), "triton")


def test_a_kernel_that_fails_to_compile_falls_back_to_the_twin(monkeypatch):
    """On a GPU, a kernel that triton cannot compile: one warning naming the error, the twin
    runs (and says so), and backend='triton' is then an error naming the reason; the
    diagonal cells' kernels are not marked broken by it."""
    from paraseq.gpu import newton as gn

    class Fails:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(scan_gpu, "interpreted", lambda: False)
    monkeypatch.setattr(scan_gpu, "triton_available", lambda device=None: True)
    monkeypatch.setattr(gd, "_kernels", types.SimpleNamespace(dense_cell_kernel=Fails()))
    monkeypatch.setattr(gd, "BROKEN", None)
    monkeypatch.setattr(gd, "_LAUNCHED", set())
    gi, h0, _, w, b = problem("gru", 1, 10, 2)
    with pytest.warns(RuntimeWarning, match="failed to compile.*PassManager"):
        s, info = gd.dense_newton("gru", gi, h0, w, b)
    assert info.jacobian == "analytic (fused dense, torch twin)" and info.converged
    assert err(s, loop("gru", gi, h0, None, w, b)) <= 1e-9
    assert gd.backend_for(torch.device("cuda")) == "torch"
    assert gn.BROKEN is None
    with pytest.raises(ValueError, match="failed to compile here"):
        gd.backend_for(torch.device("cuda"), "triton")
    # a kernel that has run before compiled: its failure is the computation's, raised
    monkeypatch.setattr(gd, "BROKEN", None)
    monkeypatch.setattr(gd, "_LAUNCHED", {"dense_cell_kernel/0/0"})
    with pytest.raises(RuntimeError, match="PassManager"):
        gd.dense_newton("gru", gi, h0, w, b)


# ----------------------------------------------------------------------------- routing


@pytest.fixture
def cpu_routed(monkeypatch):
    """The CUDA route on CPU tensors (the twin: fast; the kernel has its own tests)."""
    monkeypatch.setattr(routing, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(scan_gpu, "AVAILABLE", False)


MODULES = [(pnn.GRU, torch.nn.GRU, {}), (pnn.RNN, torch.nn.RNN, {}),
           (pnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}), (pnn.LSTM, torch.nn.LSTM, {})]


@pytest.mark.parametrize(("cls", "ref_cls", "kw"), MODULES)
def test_modules_take_the_fused_path(cls, ref_cls, kw, cpu_routed):
    """Forced newton, 2 layers, bidirectional: torch.nn's results and gradients."""
    torch.manual_seed(0)
    m = cls(3, 4, num_layers=2, bidirectional=True, method="newton", **kw).double()
    ref = ref_cls(3, 4, num_layers=2, bidirectional=True, **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70, 2, 3, dtype=torch.float64, requires_grad=True)
    out, hn = m(x)
    assert m.last_path == "fused newton (torch twin)"
    assert len(m.last_solve_info) == 4
    assert all(i.converged and i.jacobian == "analytic (fused dense, torch twin)"
               for i in m.last_solve_info)
    want, hw = ref(x)
    assert err(out, want) <= 1e-11 and err(hn, hw) <= 1e-11
    g = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    gw = torch.autograd.grad(want.sum(), [x, *ref.parameters()])
    for u, v in zip(g, gw, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("cls", "ref_cls"), [(pnn.GRU, torch.nn.GRU), (pnn.LSTM, torch.nn.LSTM)])
def test_double_backward_through_the_fused_path(cls, ref_cls, cpu_routed):
    """create_graph=True: the modules replay the layer in torch ops (paraseq.nn._twice), so a
    gradient penalty's second derivative is torch.nn's."""
    torch.manual_seed(6)
    m = cls(3, 4, method="newton").double()
    ref = ref_cls(3, 4).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70, 2, 3, dtype=torch.float64, requires_grad=True)
    out = {}
    for name, mod in (("fused", m), ("torch", ref)):
        y, _ = mod(x)
        (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        out[name] = (g, torch.autograd.grad(g.sum(), mod.weight_hh_l0)[0])
    assert m.last_path == "fused newton (torch twin)"
    for u, v in zip(out["fused"], out["torch"], strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


def test_auto_and_packed_sequences_through_the_fused_path(cpu_routed, monkeypatch):
    from torch.nn.utils.rnn import pack_padded_sequence

    monkeypatch.setattr(_paths, "compiled_pays", lambda *a: False)
    torch.manual_seed(5)
    m = pnn.LSTM(3, 4, bidirectional=True, method="auto").double()
    ref = torch.nn.LSTM(3, 4, bidirectional=True).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([70, 41, 9]), enforce_sorted=False)
    out, (h, c) = m(packed)
    want, (hw, cw) = ref(packed)
    assert m.last_path == "fused newton (torch twin)"  # auto chose Newton here, run fused
    assert err(out.data, want.data) <= 1e-11 and err((h, c), (hw, cw)) <= 1e-11


def test_module_fixed_iterations_reports_the_residual(cpu_routed):
    torch.manual_seed(1)
    m = pnn.GRU(3, 4, method="newton", iterations=2)
    m(torch.randn(70, 2, 3) * 3)
    info = m.last_solve_info[0]
    assert m.last_path == "fused newton (torch twin)"
    assert info.iterations == 2 and info.residual == info.residuals[-1] > 0


def test_module_bfloat16_through_the_route(cpu_routed):
    torch.manual_seed(2)
    m = pnn.GRU(3, 4, method="newton")
    x = torch.randn(37, 2, 3)
    ref = torch.nn.GRU(3, 4)
    ref.load_state_dict(m.state_dict())
    want, _ = ref.double()(x.bfloat16().double())
    out, _ = m.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and m.last_path == "fused newton (torch twin)"
    assert m.last_solve_info[0].tol == gd.default_tol(torch.bfloat16)
    assert err(out, want) <= 2e-2


@pytest.mark.parametrize(("make", "why"), [
    (lambda: pnn.GRU(3, 65, method="newton"), "state D=65 > 64"),
    (lambda: pnn.LSTM(3, 33, method="newton"), "state D=66 > 64"),
    (lambda: pnn.LSTM(3, 6, proj_size=2, method="newton"), "proj_size")])
def test_wide_states_take_the_general_path_and_say_so(make, why, cpu_routed):
    torch.manual_seed(3)
    m = make()
    m(torch.randn(70, 2, 3))
    assert m.last_path == f"parallel (newton), general path: {why}"
    assert all("fused" not in (i.jacobian or "") for i in m.last_solve_info)


def test_quasi_newton_is_fused_only_where_it_is_newton(cpu_routed):
    m = pnn.GRU(3, 1, method="quasi_newton")
    m(torch.randn(70, 2, 3))
    assert m.last_path == "fused newton (torch twin)"  # D = 1: the diagonal is the Jacobian
    m = pnn.GRU(3, 4, method="quasi_newton")
    m(torch.randn(70, 2, 3))
    assert m.last_path == "parallel (quasi_newton)"


@needs_triton
def test_module_runs_the_kernel(monkeypatch, small_tiles):
    monkeypatch.setattr(routing, "DEVICES", ("cpu", "cuda"))
    if not CUDA and not scan_gpu.interpreted():
        pytest.skip("triton was imported without its interpreter")
    torch.manual_seed(3)
    m = pnn.GRU(2, 3, method="newton").double().to(DEVICE)
    x = torch.randn(13, 1, 2, dtype=torch.float64, device=DEVICE)
    out, _ = m(x)
    assert m.last_path == "fused newton (triton)"
    ref = torch.nn.GRU(2, 3).double().to(DEVICE)
    ref.load_state_dict(m.state_dict())
    assert err(out, ref(x)[0]) <= 1e-12


@pytest.mark.parametrize("make", [lambda: GRUCell(3, 4), lambda: LSTMCell(3, 4),
                                  lambda: ElmanCell(3, 4, nonlinearity="relu")])
def test_solve_recurrence_routes_the_dense_cells(make, cpu_routed):
    torch.manual_seed(4)
    cell = make().double()
    x = torch.randn(2, 70, 3, dtype=torch.float64, requires_grad=True)
    states, info = paraseq.solve_recurrence(cell, x, method="newton", return_info=True)
    assert info.jacobian == "analytic (fused dense, torch twin)" and info.converged
    want = paraseq.solve_recurrence(cell, x, method="sequential")
    assert err(states, want) <= 1e-9
    loss = sum(s.sum() for s in as_tuple(states))
    lw = sum(s.sum() for s in as_tuple(want))
    for u, v in zip(torch.autograd.grad(loss, [x, *cell.parameters()]),
                    torch.autograd.grad(lw, [x, *cell.parameters()]), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-9)
    _, info = paraseq.solve_recurrence(cell, x, method="newton", grad="unrolled",
                                       return_info=True)
    assert "fused" not in (info.jacobian or "")  # only the implicit gradient is fused
    _, info = paraseq.solve_recurrence(cell, x, method="quasi_newton", return_info=True)
    assert "fused" not in (info.jacobian or "")  # the diagonal of a dense J: no Newton


def test_solve_recurrence_keeps_wide_states_on_the_general_path(cpu_routed):
    cell = GRUCell(2, 65)
    _, info = paraseq.solve_recurrence(cell, torch.randn(1, 70, 2), method="newton",
                                       return_info=True)
    assert info.converged and "fused" not in (info.jacobian or "")


def test_cpu_behaviour_is_unchanged():
    m = pnn.GRU(3, 4, method="newton")
    m(torch.randn(70, 2, 3))
    assert m.last_path == "parallel (newton)"
    assert "fused" not in (m.last_solve_info[0].jacobian or "")
    _, info = paraseq.solve_recurrence(GRUCell(3, 4), torch.randn(2, 70, 3), method="newton",
                                       return_info=True)
    assert "fused" not in (info.jacobian or "")
    assert routing.dense_route("GRU", 4, "newton") == ("gru", "")
    assert not routing.serves(torch.zeros(1))


def test_the_route_table():
    assert routing.dense_route("LSTM", 32, "newton") == ("lstm", "")
    assert routing.dense_route("RNN_RELU", 64, "newton") == ("rnn_relu", "")
    assert routing.dense_route("GRU", 1, "quasi_newton") == ("gru", "")
    assert routing.dense_route("GRU", 2, "quasi_newton") == (None, "")
    assert routing.dense_route("GRU", 8, "picard") == (None, "")
    assert routing.dense_route("LSTM", 8, "newton", proj_size=4) == (None,
                                                                     "general path: proj_size")


@pytest.mark.parametrize(("B", "T"), [(2, 0), (0, 5)])
def test_empty_inputs_give_empty_states_and_zero_gradients(B, T):
    gi, h0, c0, w, b = problem("lstm", B, T, 3)
    ins, c0 = leaves("lstm", gi, h0, c0, w, b)
    (h, c), info = solve("lstm", ins, c0, backend="torch")
    assert h.shape == c.shape == (B, T, 3) and info.iterations == 0 and info.converged
    got = torch.autograd.grad((h.sum() + c.sum()), ins)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(got, ins, strict=True))


def test_solve_is_quiet():
    """A converged solve warns about nothing."""
    gi, h0, c0, w, b = problem("lstm", 2, 70, 4, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gd.dense_newton("lstm", gi, h0, w, b, c0, backend="torch")


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_matches_the_twin(cell, dtype):
    H = 32 if cell == "lstm" else 64
    gi, h0, c0, w, b = problem(cell, 4, 2049, H, dtype, seed=23)
    ins, c0 = leaves(cell, gi, h0, c0, w, b)
    res = {}
    for backend in ("triton", "torch"):
        s, info = solve(cell, ins, c0, backend=backend)
        res[backend] = (s, info, grads(s, ins))
    (ks, ki, kg), (ts, ti, tg) = res["triton"], res["torch"]
    assert ki.converged and ti.converged and ki.jacobian.endswith("triton kernel)")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err(ks, ts) <= tol
    assert err(ks, loop(cell, ins[0], ins[1], c0, ins[2], ins[3])) <= tol
    for u, v in zip(kg, tg, strict=True):
        scale = max(1.0, v.abs().max().item())
        assert (u.float() - v.float()).abs().max().item() <= 10 * tol * scale


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_modules_take_the_fused_kernel():
    m = pnn.GRU(8, 64, method="newton").cuda()
    x = torch.randn(4096, 4, 8, device="cuda")
    out, _ = m(x)
    assert m.last_path == "fused newton (triton)"
    ref = torch.nn.GRU(8, 64).cuda()
    ref.load_state_dict(m.state_dict())
    assert err(out, ref(x)[0]) <= 1e-4


def test_the_dense_scan_kernels_compile_for_the_gpu():
    """The fused path's scan (``paraseq.scan.gpu.dense_triton_scan``) through triton's GPU
    compiler too: both kernels, both directions, the broadcast product (BD 4) and tl.dot
    (BD 64), float32."""
    cases = []
    for bd in (4, 64):
        for rev in (False, True):
            common = dict(module="paraseq.scan._triton_kernels", dtype="fp32",
                          num_warps=1 if bd <= 8 else 4)
            cases.append(dict(common, kernel="dense_chunk_reduce_kernel", constexprs=dict(
                REVERSE=rev, CHUNK=64, BLOCK_D=bd, USE_DOT=bd >= 16)))
            cases.append(dict(common, kernel="dense_chunk_apply_kernel", constexprs=dict(
                REVERSE=rev, CHUNK=64, BLOCK_D=bd)))
    got = compile_for_sm90(cases)
    assert len(got) == 8 and all(r["cubin"] > 0 for r in got)
