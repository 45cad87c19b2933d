"""paraseq.gpu: the fused Newton kernels of the diagonal GRU and LSTM, their pure-torch twin,
and the routing of paraseq.nn / solve_recurrence onto them.

Without a GPU the Triton kernels run through triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), which executes a scan row by row in Python: the sizes
stay tiny (T 37 and 70, one or two programs), and most cases use 16-step tiles
(``BLOCK_T`` patched) so that lengths span several tiles and end inside one. The reference is
the float64 loop over paraseq.cells.functional's cell equations, and autograd through it.

Shape letters: B batch, T time, H hidden size, K gates.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from torch.autograd import gradcheck

try:  # a bare GPU machine (benchmarks/gpu.py runs -m cuda there) may lack hypothesis
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton is imported: it reads the variable then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import paraseq  # noqa: E402
from paraseq import nn as pnn  # noqa: E402
from paraseq.cells import DiagGRUCell, DiagLSTMCell  # noqa: E402
from paraseq.cells import functional as CF  # noqa: E402
from paraseq.gpu import newton as gn  # noqa: E402
from paraseq.gpu import routing  # noqa: E402
from paraseq.nn import _paths  # noqa: E402
from paraseq.scan import gpu as scan_gpu  # noqa: E402

TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not TRITON, reason="triton is not installed")
DEVICE = torch.device("cuda" if CUDA else "cpu")
K = {"gru": 3, "lstm": 4}


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(gn, "BLOCK_T", 16)


def problem(kind, B, T, H, dtype=torch.float64, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)

    def r(*s, sc=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype).to(DEVICE)

    k = K[kind]
    gi, w, b = r(B, T, k * H), r(k * H, sc=scale), r(k * H, sc=0.1)
    h0 = r(B, H, sc=0.5)
    c0 = r(B, H, sc=0.5) if kind == "lstm" else None
    return gi, h0, c0, w, b


def loop(kind, gi, h0, c0, w, b):
    """The float64 sequential reference (autograd through it gives the reference gradient)."""
    gi, h0, w, b = (t.double() for t in (gi, h0, w, b))
    c = None if c0 is None else c0.double()
    h, hs, cs = h0, [], []
    for t in range(gi.shape[1]):
        if kind == "gru":
            h = CF._gru_gated(gi[:, t], h, w, b)[0]
        else:
            h, c = CF._lstm_gated(gi[:, t], h, c, w, b)[:2]
            cs.append(c)
        hs.append(h)
    hs = torch.stack(hs, 1)
    return hs if kind == "gru" else (hs, torch.stack(cs, 1))


def true_residual(kind, gi, h0, c0, w, b, states):
    """max_t |s_t - f(s_{t-1})| / (1 + |f|) of a trajectory, by the float64 cell functions
    over all B T rows at once."""
    B, T, KH = gi.shape
    st_ = [s.double() for s in as_tuple(states)]
    s0 = [h0.double()] + ([c0.double()] if c0 is not None else [])
    prev = [torch.cat([a.unsqueeze(1), s[:, :-1]], 1).reshape(B * T, -1) for a, s in
            zip(s0, st_, strict=True)]
    g = gi.double().reshape(B * T, KH)
    if kind == "gru":
        f = [CF._gru_gated(g, prev[0], w.double(), b.double())[0]]
    else:
        f = list(CF._lstm_gated(g, prev[0], prev[1], w.double(), b.double())[:2])
    return max(((s.reshape(B * T, -1) - v).abs() / (1 + v.abs())).max().item()
               for s, v in zip(st_, f, strict=True))


def as_tuple(s):
    return s if isinstance(s, tuple) else (s,)


def err(got, want):
    return max((a.double() - b.double()).abs().max().item()
               for a, b in zip(as_tuple(got), as_tuple(want), strict=True))


def grads(kind, states, ins, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((s.double() * torch.randn(s.shape, generator=g, dtype=torch.float64)
                .to(s.device)).sum() for s in as_tuple(states))
    return torch.autograd.grad(loss, ins)


def leaves(gi, h0, c0, w, b):
    ins = [t.detach().requires_grad_() for t in (gi, h0, w, b)]
    c = None if c0 is None else c0.detach().requires_grad_()
    return ins, c


# ----------------------------------------------------------------------------- the twin


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize(("B", "T", "H"), [(1, 1, 1), (2, 37, 3), (3, 70, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_twin_matches_the_float64_loop(kind, B, T, H, dtype):
    gi, h0, c0, w, b = problem(kind, B, T, H, dtype, seed=T)
    states, info = gn.diag_newton(kind, gi, h0, w, b, c0, backend="torch")
    assert info.converged and not info.fell_back and info.jacobian.endswith("torch twin)")
    assert info.iterations <= 10
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert err(states, loop(kind, gi, h0, c0, w, b)) <= tol
    assert all(s.dtype == dtype and s.shape == (B, T, H) for s in as_tuple(states))


if given is not None:  # the property test needs hypothesis
    @settings(max_examples=20, deadline=None)
    @given(kind=st.sampled_from(["gru", "lstm"]), B=st.integers(1, 4), T=st.integers(1, 150),
           H=st.integers(1, 6), double=st.booleans(), fixed=st.sampled_from([None, 1, 3]),
           seed=st.integers(0, 2 ** 16))
    def test_twin_property(kind, B, T, H, double, fixed, seed):
        """Any shape and length: the adaptive solve is the loop (float64 tight, float32 loose);
        a fixed count K reports the residual of the iterate it returns, and after K iterations
        at least the first K steps are exact (the initial state travels one step per iteration)."""
        dtype = torch.float64 if double else torch.float32
        gi, h0, c0, w, b = problem(kind, B, T, H, dtype, seed=seed)
        ref = loop(kind, gi, h0, c0, w, b)
        states, info = gn.diag_newton(kind, gi, h0, w, b, c0, backend="torch", iterations=fixed)
        if fixed is None:
            assert info.converged or info.fell_back
            assert err(states, ref) <= (1e-9 if double else 1e-4)
            return
        assert info.iterations == fixed
        k = min(fixed, T)
        assert err(tuple(s[:, :k] for s in as_tuple(states)),
                   tuple(r[:, :k] for r in as_tuple(ref))) <= (1e-12 if double else 1e-5)
        true = true_residual(kind, gi, h0, c0, w, b, states)
        assert info.residual == pytest.approx(true, rel=1e-6, abs=1e-12 if double else 2e-6)
        assert info.residuals == [info.residual]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_twin_gradcheck(kind):
    gi, h0, c0, w, b = problem(kind, 1, 7, 2, seed=3)
    (gi, h0, w, b), c0 = leaves(gi, h0, c0, w, b)
    if kind == "gru":
        fn = lambda gi, h0, w, b: gn.diag_newton(kind, gi, h0, w, b, backend="torch",  # noqa: E731
                                                 tol=1e-13)[0]
        assert gradcheck(fn, (gi, h0, w, b))
    else:
        def fn(gi, h0, c0, w, b):
            return gn.diag_newton(kind, gi, h0, w, b, c0, backend="torch", tol=1e-13)[0]
        assert gradcheck(fn, (gi, h0, c0, w, b))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_twin_gradients_are_autograd_through_the_loop(kind):
    gi, h0, c0, w, b = problem(kind, 2, 70, 4, seed=5)
    ins, c0 = leaves(gi, h0, c0, w, b)
    ins = ins + ([c0] if c0 is not None else [])
    states, _ = gn.diag_newton(kind, ins[0], ins[1], ins[2], ins[3], c0, backend="torch")
    got = grads(kind, states, ins)
    want = grads(kind, loop(kind, ins[0], ins[1], c0, ins[2], ins[3]), ins)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-11)


# ----------------------------------------------------------------------------- the kernels


@needs_triton
@pytest.mark.parametrize(("kind", "T", "block_t"), [("gru", 70, 16), ("lstm", 37, 16),
                                                    ("gru", 37, 64)])
def test_kernels_match_the_twin_and_the_loop(kind, T, block_t, monkeypatch):
    """Forward (every iterate's residual) and backward, float64, lengths that end inside a
    tile; against the twin to rounding and the float64 loop to the tolerance."""
    monkeypatch.setattr(gn, "BLOCK_T", block_t)
    gi, h0, c0, w, b = problem(kind, 1, T, 3, seed=T)
    ins, c0 = leaves(gi, h0, c0, w, b)
    ins = ins + ([c0] if c0 is not None else [])
    out = {}
    for backend in ("triton", "torch"):
        states, info = gn.diag_newton(kind, ins[0], ins[1], ins[2], ins[3], c0,
                                      backend=backend, tol=1e-12)
        out[backend] = (states, info, grads(kind, states, ins))
    (ks, ki, kg), (ts, ti, tg) = out["triton"], out["torch"]
    assert ki.jacobian.endswith("triton kernel)") and ki.converged
    assert ki.iterations == ti.iterations
    for a, c in zip(ki.residuals, ti.residuals, strict=True):
        assert abs(a - c) <= 1e-12 + 1e-9 * c
    assert err(ks, ts) <= 1e-14
    assert err(ks, loop(kind, *[t.detach() for t in (gi, h0)], c0, w, b)) <= 1e-11
    want = grads(kind, loop(kind, ins[0], ins[1], c0, ins[2], ins[3]), ins)
    for u, v, x in zip(kg, tg, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(u, x, rtol=1e-10, atol=1e-11)


@needs_triton
def test_kernel_channel_blocks_strides_and_fixed_iterations(small_tiles):
    """float32, H = 33 (two channel blocks, the second mostly padding), gi a time-major
    transpose (strided, as paraseq.nn hands it over), iterations=K fixed: the kernel and the
    twin reach the same iterate and report the same residual."""
    gi, h0, _, w, b = problem("gru", 1, 37, 33, torch.float32, seed=7)
    gi_t = gi.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, 3 H), strides of (T, B, .)
    res = {}
    for backend in ("triton", "torch"):
        res[backend] = gn.diag_newton("gru", gi_t, h0, w, b, iterations=2, backend=backend)
    (ks, ki), (ts, ti) = res["triton"], res["torch"]
    assert ki.iterations == ti.iterations == 2 and len(ki.residuals) == 1
    assert ki.residual == pytest.approx(ti.residual, rel=1e-3)
    assert err(ks, ts) <= 1e-5
    assert not ki.converged  # two iterations from zero are not a solution here
    assert ki.residual > 1e-3


@needs_triton
def test_kernel_bfloat16_accumulates_in_float32(small_tiles):
    gi, h0, c0, w, b = problem("lstm", 1, 37, 3, torch.float64, seed=11)
    low = [t.to(torch.bfloat16) for t in (gi, h0, c0, w, b)]
    states, info = gn.diag_newton("lstm", low[0], low[1], low[3], low[4], low[2],
                                  backend="triton")
    assert info.converged and info.tol == gn.LOW_PRECISION_TOL[torch.bfloat16]
    assert all(s.dtype == torch.bfloat16 for s in states)
    ref = loop("lstm", low[0], low[1], low[2], low[3], low[4])  # float64 on the bf16 inputs
    twin_states, _ = gn.diag_newton("lstm", low[0], low[1], low[3], low[4], low[2],
                                    backend="torch")
    assert err(states, ref) <= 2e-2  # the bf16 rounding of the outputs (states of order one)
    assert err(states, twin_states) <= 1e-2


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_in_float32_with_its_tolerance(dtype):
    gi, h0, _, w, b = problem("gru", 2, 70, 4, torch.float64, seed=13)
    low = [t.to(dtype).requires_grad_() for t in (gi, h0, w, b)]
    states, info = gn.diag_newton("gru", *low, backend="torch")
    assert states.dtype == dtype and info.converged
    assert info.tol == gn.LOW_PRECISION_TOL[dtype] < {torch.bfloat16: 4e-3,
                                                      torch.float16: 5e-4}[dtype]
    gi, h0, w, b = (t.detach() for t in low)
    ref = loop("gru", gi, h0, None, w, b)
    # the float32 solve's only error beyond the solve's tolerance is the output's rounding
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert err(states, ref) <= 2 * ulp
    got = torch.autograd.grad(states.float().sum(), low)
    assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in got)


# ----------------------------------------------------------------------------- failure


def test_failure_modes():
    """An iteration cap below what Newton needs: fallback finishes with the loop from the first
    failing step, raise raises, warn warns and returns the iterate."""
    gi, h0, _, w, b = problem("gru", 2, 70, 3, seed=17, scale=2.0)
    ref = loop("gru", gi, h0, None, w, b)
    s, info = gn.diag_newton("gru", gi, h0, w, b, max_iter=1, tol=1e-12, backend="torch")
    assert info.fell_back and 0 <= info.fallback_from < 70 and not info.converged
    assert err(s, ref) <= 1e-12
    with pytest.raises(paraseq.ConvergenceError, match="residual"):
        gn.diag_newton("gru", gi, h0, w, b, max_iter=1, tol=1e-12, on_failure="raise",
                       backend="torch")
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = gn.diag_newton("gru", gi, h0, w, b, max_iter=1, tol=1e-12, on_failure="warn",
                                 backend="torch")
    assert not info.fell_back and info.residual > 1e-12


def test_nan_is_reported_not_passed():
    gi, h0, _, w, b = problem("gru", 1, 37, 2, seed=19)
    gi[0, 20, 1] = float("nan")
    with pytest.raises(paraseq.ConvergenceError):
        gn.diag_newton("gru", gi, h0, w, b, on_failure="raise", backend="torch")
    s, info = gn.diag_newton("gru", gi, h0, w, b, backend="torch")
    ref = loop("gru", gi, h0, None, w, b)
    assert info.fell_back and info.fallback_from <= 20 and info.iterations == 1
    assert torch.equal(s.isnan(), ref.isnan()) and err(s[:, :20], ref[:, :20]) <= 1e-12


def test_bad_input_is_a_clear_error():
    gi, h0, c0, w, b = problem("lstm", 2, 5, 3)
    with pytest.raises(ValueError, match="cell must be one of"):
        gn.diag_newton("elman", gi, h0, w, b)
    with pytest.raises(ValueError, match="needs c0"):
        gn.diag_newton("lstm", gi, h0, w, b)
    with pytest.raises(ValueError, match=r"weight_hh must have shape \(12,\)"):
        gn.diag_newton("lstm", gi, h0, w[:5], b, c0)
    with pytest.raises(TypeError, match="gi must be float32"):
        gn.diag_newton("lstm", gi.to(torch.int32), h0, w, b, c0)
    with pytest.raises(ValueError, match="not both"):
        gn.diag_newton("lstm", gi, h0, w, b, c0, iterations=2, max_iter=3)
    with pytest.raises(ValueError, match="backend must be one of"):
        gn.diag_newton("lstm", gi, h0, w, b, c0, backend="cuda")
    with pytest.raises(ValueError, match=r"h0 is on meta but gi is on"):
        gn.diag_newton("lstm", gi, h0.to("meta"), w, b, c0)


def test_missing_triton_means_the_twin(monkeypatch):
    monkeypatch.setattr(scan_gpu, "AVAILABLE", False)
    assert gn.backend_for(torch.device("cuda")) == "torch"
    assert routing.label(torch.device("cuda")) == "fused newton (torch twin)"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run.*pip install triton"):
        gn.backend_for(torch.device("cpu"), "triton")


def test_a_kernel_that_fails_to_compile_falls_back_to_the_twin(monkeypatch):
    """On a GPU, a kernel that triton cannot compile: one warning naming the error, the twin
    runs (and says so), and backend='triton' is then an error naming the reason."""
    import types

    class Fails:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(scan_gpu, "interpreted", lambda: False)
    monkeypatch.setattr(scan_gpu, "triton_available", lambda device=None: True)
    monkeypatch.setattr(gn, "_kernels", types.SimpleNamespace(gru_newton_kernel=Fails()))
    monkeypatch.setattr(gn, "BROKEN", None)
    monkeypatch.setattr(gn, "_LAUNCHED", set())
    gi, h0, _, w, b = problem("gru", 1, 10, 2)
    with pytest.warns(RuntimeWarning, match="failed to compile.*PassManager"):
        s, info = gn.diag_newton("gru", gi, h0, w, b)
    assert info.jacobian == "analytic (fused, torch twin)" and info.converged
    assert err(s, loop("gru", gi, h0, None, w, b)) <= 1e-9
    assert gn.backend_for(torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="failed to compile here"):
        gn.backend_for(torch.device("cuda"), "triton")


def test_kernels_compile_for_the_gpu():
    """triton's GPU compiler (sm_90, down to the cubin) takes all four kernels, which the
    interpreter cannot check: a global that is not a constexpr (CLIP) made the forward
    kernels fail there, and the fused path would have run its twin on every GPU."""
    from gpu_compile import compile_for_sm90

    got = compile_for_sm90([dict(module="paraseq.gpu._kernels", kernel=k, dtype="fp32",
                                 constexprs=dict(BLOCK_T=64, BLOCK_D=32), num_warps=4)
                            for k in ("gru_newton_kernel", "gru_adjoint_kernel",
                                      "lstm_newton_kernel", "lstm_adjoint_kernel")])
    assert len(got) == 4 and all(r["cubin"] > 0 for r in got)


# ----------------------------------------------------------------------------- routing


@pytest.fixture
def cpu_routed(monkeypatch):
    """The CUDA route on CPU tensors (the twin: fast; the kernels have their own tests)."""
    monkeypatch.setattr(routing, "DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(scan_gpu, "AVAILABLE", False)


@pytest.mark.parametrize("cls", [pnn.DiagGRU, pnn.DiagLSTM])
@pytest.mark.parametrize("method", ["auto", "newton", "quasi_newton"])
def test_modules_take_the_fused_path(cls, method, cpu_routed, monkeypatch):
    monkeypatch.setattr(_paths, "compiled_pays", lambda *a: False)  # the reference: a loop
    torch.manual_seed(0)
    L = 2 if method == "auto" else 1
    m = cls(3, 4, num_layers=L, bidirectional=True, method=method).double()
    ref = cls(3, 4, num_layers=L, bidirectional=True, method="sequential").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70, 2, 3, dtype=torch.float64, requires_grad=True)
    out, hn = m(x)
    assert m.last_path == "fused newton (torch twin)"
    assert len(m.last_solve_info) == 2 * L and all(i.converged for i in m.last_solve_info)
    want, hw = ref(x)
    assert ref.last_path == "loop"
    assert err(out, want) <= 1e-11 and err(hn, hw) <= 1e-11
    g = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    gw = torch.autograd.grad(want.sum(), [x, *ref.parameters()])
    for u, v in zip(g, gw, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


def test_packed_sequences_through_the_fused_path(cpu_routed, monkeypatch):
    from torch.nn.utils.rnn import pack_padded_sequence

    monkeypatch.setattr(_paths, "compiled_pays", lambda *a: False)
    torch.manual_seed(5)
    m = pnn.DiagLSTM(3, 4, bidirectional=True, method="newton").double()
    ref = pnn.DiagLSTM(3, 4, bidirectional=True, method="sequential").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(70, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([70, 41, 9]), enforce_sorted=False)
    out, (h, c) = m(packed)
    want, (hw, cw) = ref(packed)
    assert m.last_path == "fused newton (torch twin)"
    assert err(out.data, want.data) <= 1e-11 and err((h, c), (hw, cw)) <= 1e-11


def test_module_fixed_iterations_reports_the_residual(cpu_routed):
    torch.manual_seed(1)
    m = pnn.DiagGRU(3, 4, method="newton", iterations=2)
    x = torch.randn(70, 2, 3)
    m(x)
    info = m.last_solve_info[0]
    assert info.iterations == 2 and info.residual == info.residuals[-1] > 0
    with pytest.raises(ValueError, match="not both"):
        pnn.DiagGRU(3, 4, iterations=2, max_iter=3)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        pnn.DiagGRU(3, 4, iterations=0)


@pytest.mark.parametrize("make", [lambda: pnn.DiagGRU(3, 4, method="newton", iterations=2),
                                  lambda: pnn.GRU(3, 4, method="newton", iterations=2)])
def test_fixed_iterations_off_the_fused_path(make):
    """On the CPU paths iterations=K caps the solve at K and returns the iterate as reached,
    without fallback or warning, its residual reported."""
    torch.manual_seed(6)
    m = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(70, 2, 3) * 3)
    info = m.last_solve_info[0]
    assert info.iterations <= 2 and not info.fell_back
    assert info.residual == info.residuals[-1]


def test_module_bfloat16_through_the_route(cpu_routed, monkeypatch):
    monkeypatch.setattr(_paths, "compiled_pays", lambda *a: False)
    torch.manual_seed(2)
    m = pnn.DiagLSTM(3, 4, method="auto")
    x = torch.randn(37, 2, 3)
    want = pnn.DiagLSTM(3, 4, method="sequential")
    want.load_state_dict(m.state_dict())
    ref, _ = want.double()(x.bfloat16().double())
    out, _ = m.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16 and m.last_path == "fused newton (torch twin)"
    assert m.last_solve_info[0].tol == gn.LOW_PRECISION_TOL[torch.bfloat16]
    assert err(out, ref) <= 2e-2


@needs_triton
def test_module_runs_the_kernels(monkeypatch, small_tiles):
    monkeypatch.setattr(routing, "DEVICES", ("cpu", "cuda"))
    if not CUDA and not scan_gpu.interpreted():
        pytest.skip("triton was imported without its interpreter")
    torch.manual_seed(3)
    m = pnn.DiagGRU(2, 3, method="auto").double().to(DEVICE)
    x = torch.randn(37, 1, 2, dtype=torch.float64, device=DEVICE)
    out, _ = m(x)
    assert m.last_path == "fused newton (triton)"
    ref = pnn.DiagGRU(2, 3, method="sequential").double().to(DEVICE)
    ref.load_state_dict(m.state_dict())
    assert err(out, ref(x)[0]) <= 1e-12


@pytest.mark.parametrize("cell_cls", [DiagGRUCell, DiagLSTMCell])
def test_solve_recurrence_routes_the_diagonal_cells(cell_cls, cpu_routed):
    torch.manual_seed(4)
    cell = cell_cls(3, 4).double()
    x = torch.randn(2, 70, 3, dtype=torch.float64, requires_grad=True)
    states, info = paraseq.solve_recurrence(cell, x, method="newton", return_info=True)
    assert info.jacobian == "analytic (fused, torch twin)" and info.converged
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


def test_cpu_behaviour_is_unchanged():
    m = pnn.DiagGRU(3, 4, method="newton")
    m(torch.randn(70, 2, 3))
    assert m.last_path == "parallel (newton)"
    assert not routing.serves(torch.zeros(1))


def test_the_cuda_rule_is_a_documented_threshold():
    """The dense modules' auto rule on CUDA (uncalibrated): long sequences with a tiny state
    take Newton, everything else cuDNN; training halves the budget."""
    assert routing.CUDA_RULE.calibrated is None
    assert routing.newton_beats_cudnn(16, 100_000, 8, training=False)
    assert not routing.newton_beats_cudnn(16, 100_000, 8, training=True)
    assert not routing.newton_beats_cudnn(16, 1000, 1, training=False)
    assert not routing.newton_beats_cudnn(16, 100_000, 256, training=False)


    class OnCuda:  # what _paths.choose reads of the input: its device and dtype
        device, dtype = torch.device("cuda"), torch.float32

    x = OnCuda()
    gru, diag = pnn.GRU(3, 8), pnn.DiagGRU(3, 8)
    assert gru._choose(x, 100_000, 16, False) == "newton"
    assert gru._choose(x, 100_000, 64, False) == "sequential"  # cuDNN
    assert gru._choose(x, 50, 1, False) == "sequential"
    assert diag._choose(x, 50, 1, True) == "newton"  # the module runs it fused
    assert pnn.GRU(3, 8, method="quasi_newton")._choose(x, 50, 1, False) == "quasi_newton"


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_the_twin(kind, dtype):
    gi, h0, c0, w, b = problem(kind, 8, 2049, 96, dtype, seed=23)
    ins, c0 = leaves(gi, h0, c0, w, b)
    ins = ins + ([c0] if c0 is not None else [])
    res = {}
    for backend in ("triton", "torch"):
        s, info = gn.diag_newton(kind, ins[0], ins[1], ins[2], ins[3], c0, backend=backend)
        res[backend] = (s, info, grads(kind, s, ins))
    (ks, ki, kg), (ts, ti, tg) = res["triton"], res["torch"]
    assert ki.converged and ti.converged
    assert ki.jacobian.endswith("triton kernel)")  # the kernel ran, not the twin's fallback
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert err(ks, ts) <= tol
    assert err(ks, loop(kind, ins[0], ins[1], c0, ins[2], ins[3])) <= tol
    for u, v in zip(kg, tg, strict=True):
        scale = max(1.0, v.abs().max().item())
        assert (u.float() - v.float()).abs().max().item() <= 10 * tol * scale


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_modules_take_the_fused_kernels():
    m = pnn.DiagGRU(8, 64, method="auto").cuda()
    x = torch.randn(4096, 4, 8, device="cuda")
    out, _ = m(x)
    assert m.last_path == "fused newton (triton)"
    ref = pnn.DiagGRU(8, 64, method="sequential").cuda()
    ref.load_state_dict(m.state_dict())
    assert err(out, ref(x)[0]) <= 1e-4


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_empty_batch(kind):
    """No rows: empty states, zero gradients, no reduction over nothing."""
    gi, h0, c0, w, b = problem(kind, 0, 9, 4)
    ins, c0 = leaves(gi, h0, c0, w, b)
    s, info = gn.diag_newton(kind, ins[0], ins[1], ins[2], ins[3], c0, backend="torch")
    assert all(t.shape == (0, 9, 4) for t in (s if isinstance(s, tuple) else (s,)))
    assert info.iterations == 0
    gs = torch.autograd.grad(sum(t.sum() for t in (s if isinstance(s, tuple) else (s,))),
                             ins, allow_unused=True)
    assert all(g is None or not g.any() for g in gs)
