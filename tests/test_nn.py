"""paraseq.nn.RNN/GRU/LSTM against torch.nn's modules (the reference), and the diagonal-
recurrence modules against their own sequential loop.

Parity means: outputs to 1e-5 relative (float32) / 1e-10 (float64), gradients with respect to
the input, hx and every parameter to 1e-4 / 1e-8, for every method. float64 is compared with
torch.nn's float64 directly; float32 with torch.nn's module run in float64 (the exact answer),
to 1e-5 / 1e-4 or 10x torch.nn's own float32 error there, whichever is larger: a tiny tensor
(an h_n of size 1e-3) has a relative rounding error above 1e-5 in torch's float32 as well.
Every parallel forward is also checked for how it ended: a fallback, where one happened
(picard nearly always), is named in ``last_path``, and none happens with newton or
damped_newton. quasi_newton and jacobi are asserted not to fall back in the fixed-seed tests
and, in the hypothesis test, for T <= 8: every method is exact after T iterations, and
before the solver's patience (8 iterations without halving the residual) can stop it; on
longer sequences they can stall and fall back (hypothesis found quasi_newton on a tanh RNN,
H = 3, T = 40; jacobi on an LSTM, H = 2, T = 40, and on relu RNNs that grow).
"""

from __future__ import annotations

import copy
import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import paraseq.nn as pnn
from paraseq.cells import compiled
from paraseq.solve.methods import METHODS

ALL_METHODS = ["auto", *METHODS]
CONVERGING = ("newton", "damped_newton", "quasi_newton", "jacobi")
EXACT = ("newton", "damped_newton")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
OUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
F32_SLACK = 10  # float32: within 10x torch.nn's own float32 error when that exceeds the bound


def _pair(mode: str, seed: int = 0, dtype=torch.float64, **kw):
    """(torch module, paraseq module) built from the same seed, so with the same weights."""
    nonlin = kw.pop("nonlinearity", None)
    method = kw.pop("method", "auto")
    torch_kw = dict(kw, nonlinearity=nonlin) if mode == "RNN" and nonlin else kw
    torch.manual_seed(seed)
    ref = getattr(torch.nn, mode)(**torch_kw).to(dtype)
    torch.manual_seed(seed)
    ours = getattr(pnn, mode)(**torch_kw, method=method).to(dtype)
    return ref, ours


def _flat(out):
    """(output, h_n) or (output, (h_n, c_n)) -> a list of tensors."""
    y, h = out
    y = y.data if hasattr(y, "batch_sizes") else y
    return [y, *(h if isinstance(h, tuple) else (h,))]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _to64(t):
    """A float64 copy: a fresh leaf where t requires grad; PackedSequence and tuples too."""
    if t is None:
        return None
    if isinstance(t, PackedSequence):
        return t.double()
    if isinstance(t, tuple):
        return tuple(_to64(u) for u in t)
    return t.detach().double().requires_grad_(t.requires_grad)


def _leaves(x, hx):
    return [t for t in ([x] + (list(hx) if isinstance(hx, tuple) else [hx]))
            if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(module, x, hx, check_grad):
    """The outputs (a flat list) and, with check_grad, the gradients of a fixed random
    weighting of them with respect to the leaves of x and hx and every parameter."""
    out = _flat(module(x, hx))
    if not check_grad:
        return out, []
    g = torch.Generator().manual_seed(123)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in out]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out, strict=True)),
                                _leaves(x, hx) + list(module.parameters()))
    return out, list(grads)


def _compare(ref, ours, x, hx, dtype, check_grad=True):
    """ours against torch's module ref, outputs and gradients (see the module docstring)."""
    o, go = _run(ours, x, hx, check_grad)
    r, gr = _run(ref, x, hx, check_grad)
    for a, b in zip(o, r, strict=True):
        assert a.shape == b.shape
    if dtype == torch.float64:
        for got, want, tol in ((o, r, OUT_TOL), (go, gr, GRAD_TOL)):
            for a, b in zip(got, want, strict=True):
                assert _rel(a, b) <= tol[dtype], _rel(a, b)
        return
    ref64 = copy.deepcopy(ref).double()
    r64, g64 = _run(ref64, _to64(x), _to64(hx), check_grad)
    for got, torch32, exact, tol in ((o, r, r64, OUT_TOL), (go, gr, g64, GRAD_TOL)):
        for a, b, c in zip(got, torch32, exact, strict=True):
            bound = max(tol[dtype], F32_SLACK * _rel(b, c))
            assert _rel(a, c) <= bound, (_rel(a, c), _rel(b, c))


def _check_path(m, method, converges=None):
    """last_path names a fallback exactly when one happened; converging methods (or
    ``converges=True``) never fall back (within these tests' problems)."""
    infos = m.last_solve_info
    fell = [i for i in infos if i.fell_back]
    if fell:
        t = min(i.fallback_from for i in fell)
        assert m.last_path.endswith(f", fell back at t={t} ({len(fell)} of {len(infos)} "
                                    f"solves)"), m.last_path
    else:
        assert "fell back" not in m.last_path, m.last_path
    if converges is None:
        converges = method in CONVERGING
    if converges:
        assert infos and m.last_path == f"parallel ({method})", m.last_path
        assert all(i.converged and not i.fell_back for i in infos), \
            [(i.iterations, i.residuals[-3:]) for i in infos]
    if infos:
        assert all(i.converged for i in infos)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("mode,kw", [
    ("RNN", {}), ("RNN", {"nonlinearity": "relu", "bias": False}),
    ("GRU", {"num_layers": 3, "bidirectional": True}),
    ("LSTM", {"num_layers": 2, "proj_size": 2}),
    ("LSTM", {"bidirectional": True, "bias": False, "proj_size": 3}),
])
def test_same_seed_same_parameters_and_state_dict_round_trips(mode, kw):
    ref, ours = _pair(mode, seed=7, input_size=3, hidden_size=5, **kw)
    sr, so = ref.state_dict(), ours.state_dict()
    assert list(sr) == list(so)
    for k in sr:
        assert sr[k].shape == so[k].shape and torch.equal(sr[k], so[k]), k
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    # both directions, from modules with other weights
    torch.manual_seed(99)
    other_ref = getattr(torch.nn, mode)(3, 5, **kw).double()
    ours.load_state_dict(other_ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                 other_ref.state_dict().values(), strict=True))
    torch.manual_seed(98)
    other_ours = getattr(pnn, mode)(3, 5, **kw).double()
    ref.load_state_dict(other_ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                 other_ours.state_dict().values(), strict=True))
    assert [[p.shape for p in ws] for ws in ours.all_weights] == \
        [[p.shape for p in ws] for ws in ref.all_weights]
    # torch's repr omits nonlinearity='relu'; ours shows it
    assert repr(ours).split("(", 1)[1].replace(", nonlinearity='relu'", "") == \
        repr(ref).split("(", 1)[1]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("method", ALL_METHODS)
@DTYPES
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(nonlinearity=st.sampled_from(["tanh", "relu"]), num_layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
       input_size=st.integers(1, 3), H=st.integers(1, 5), proj=st.integers(0, 4),
       T=st.sampled_from([1, 2, 8, 17, 40, 71]), B=st.integers(1, 3), unbatched=st.booleans(),
       with_hx=st.booleans(), seed=st.integers(0, 2**16))
def test_parity_with_torch(mode, method, dtype, nonlinearity, num_layers, bidirectional,
                           batch_first, bias, input_size, H, proj, T, B, unbatched, with_hx,
                           seed):
    """Every mode x method x dtype; hypothesis draws the rest (derandomized: the same
    examples on every run). proj_size = proj mod H, so 0 <= proj_size < H."""
    n = input_size
    kw = dict(input_size=n, hidden_size=H, num_layers=num_layers, bias=bias,
              batch_first=batch_first, bidirectional=bidirectional, method=method)
    if mode == "RNN":
        kw["nonlinearity"] = nonlinearity
    if mode == "LSTM" and proj % H:
        kw["proj_size"] = proj % H
    ref, ours = _pair(mode, seed, dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    shape = (T, n) if unbatched else ((B, T, n) if batch_first else (T, B, n))
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    hx = None
    if with_hx:
        LD = num_layers * (2 if bidirectional else 1)
        lead = (LD,) if unbatched else (LD, B)
        hout = kw.get("proj_size", H)
        h0 = (0.5 * torch.randn(*lead, hout, generator=g, dtype=dtype)).requires_grad_()
        hx = h0
        if mode == "LSTM":
            hx = (h0, (0.5 * torch.randn(*lead, H, generator=g, dtype=dtype)).requires_grad_())
    _compare(ref, ours, x, hx, dtype)
    _check_path(ours, method, converges=method in EXACT or (method in CONVERGING and T <= 8))


def test_picard_falls_back_and_says_so():
    """Picard (A = I) diverges on these cells beyond a few steps: its results are the
    fallback's, and last_path says so (parity itself is checked above)."""
    ref, ours = _pair("GRU", 0, torch.float64, input_size=3, hidden_size=4, num_layers=2,
                      method="picard")
    x = torch.randn(71, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        _compare(ref, ours, x, None, torch.float64, check_grad=False)
    _check_path(ours, "picard")
    assert ours.last_path.startswith("parallel (picard), fell back at t=")
    assert all(i.fell_back and i.fallback_from < 71 for i in ours.last_solve_info)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("method", ALL_METHODS)
@DTYPES
def test_packed_sequences_match_torch(mode, method, dtype):
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, method=method)
    if mode == "LSTM":
        kw["proj_size"] = 2
    ref, ours = _pair(mode, 3, dtype, **kw)
    g = torch.Generator().manual_seed(3)
    T, lengths = 30, torch.tensor([7, 30, 13, 1, 30])
    x = torch.randn(T, 5, 3, generator=g, dtype=dtype)
    x_req = x.clone().requires_grad_()
    packed = pack_padded_sequence(x_req, lengths, enforce_sorted=False)
    hout = 2 if mode == "LSTM" else 4
    h0 = torch.randn(4, 5, hout, generator=g, dtype=dtype).requires_grad_()
    hx = h0
    if mode == "LSTM":
        hx = (h0, torch.randn(4, 5, 4, generator=g, dtype=dtype).requires_grad_())
    _compare(ref, ours, packed, hx, dtype)
    _check_path(ours, method)
    y = ours(packed, hx)[0]
    assert isinstance(y, PackedSequence)
    assert torch.equal(y.batch_sizes, packed.batch_sizes)
    assert torch.equal(y.unsorted_indices, packed.unsorted_indices)


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_padding_never_changes_valid_positions(mode):
    torch.manual_seed(0)
    m = getattr(pnn, mode)(2, 3, bidirectional=True, method="newton").double()
    lengths = torch.tensor([80, 5, 66])
    x = torch.randn(80, 3, 2, dtype=torch.float64)
    y1, h1 = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    x2 = x.clone()
    for b, L in enumerate(lengths):
        x2[L:, b] = 1e3 * torch.randn(80 - L, 2, dtype=torch.float64)
    y2, h2 = m(pack_padded_sequence(x2, lengths, enforce_sorted=False))
    assert torch.allclose(y1.data, y2.data, rtol=0, atol=1e-12)
    for a, b in zip(_flat((y1, h1))[1:], _flat((y2, h2))[1:], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,kw", [
    ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}), ("GRU", {}),
    ("LSTM", {"proj_size": 3}),
], ids=["rnn_tanh", "rnn_relu", "gru", "lstm_proj"])
@pytest.mark.parametrize("method", ["sequential", "newton", "quasi_newton"])
def test_dropout_between_layers_matches_torch_in_training(mode, kw, method):
    """The same dropout masks as torch's kernels (one F.dropout per layer boundary, in torch's
    order); "sequential" for GRU is the compiled loop where numba is present."""
    ref, ours = _pair(mode, 1, torch.float64, input_size=3, hidden_size=5, num_layers=3,
                      dropout=0.5, bidirectional=True, method=method, **kw)
    x = torch.randn(50, 4, 3, dtype=torch.float64)
    torch.manual_seed(5)
    r = _flat(ref(x))
    torch.manual_seed(5)
    o = _flat(ours(x))
    for a, b in zip(o, r, strict=True):
        assert _rel(a, b) < 1e-10
    if method != "sequential":
        _check_path(ours, method)
    ours.eval()
    ref.eval()
    assert _rel(ours(x)[0], ref(x)[0]) < 1e-10


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_auto_is_parallel_for_long_sequences_and_native_for_short(mode):
    kw = {"proj_size": 2} if mode == "LSTM" else {}
    ref, ours = _pair(mode, 0, torch.float32, input_size=2, hidden_size=3, **kw)
    x = torch.randn(2000, 1, 2)
    with torch.no_grad():
        _compare(ref, ours, x, None, torch.float32, check_grad=False)
    if compiled.AVAILABLE:  # small B H: the compiled loop
        assert ours.last_path == "compiled loop" and ours.last_solve_info == []
    else:
        assert ours.last_solve_info and ours.last_solve_info[0].method == "newton"
        assert all(i.converged and not i.fell_back for i in ours.last_solve_info)
        assert ours.last_path == "parallel (newton)"
    ours(x[:30])
    assert ours.last_solve_info == []  # short: a loop
    assert ours.last_path in ("torch kernel", "compiled loop")


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_sequential_paths_both_match_torch(mode, batch_first):
    """Where the compiled loop beats torch's kernel (narrow; numba present): the compiled loop,
    elsewhere torch's kernel; both give torch.nn's numbers and gradients."""
    from paraseq.nn.rnn import _compiled_beats_torch

    kw = {"proj_size": 2} if mode == "LSTM" else {}
    for B, H in ((2, 8), (16, 300) if mode != "LSTM" else (20, 12)):
        ref, ours = _pair(mode, B, torch.float64, input_size=3, hidden_size=H, num_layers=2,
                          bidirectional=True, batch_first=batch_first, method="sequential", **kw)
        x = torch.randn((B, 6, 3) if batch_first else (6, B, 3), dtype=torch.float64,
                        requires_grad=True)
        _compare(ref, ours, x, None, torch.float64)
        full = {"RNN": "RNN_TANH"}.get(mode, mode)
        narrow = _compiled_beats_torch(full, B, H, True) and compiled.AVAILABLE
        assert narrow == (H == 8)
        assert ours.last_path == ("compiled loop" if narrow else "torch kernel")


def test_gradcheck_parallel_path():
    torch.manual_seed(0)
    m = pnn.LSTM(2, 3, proj_size=2, bidirectional=True, method="newton").double()
    x = torch.randn(9, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h0, c0):
        y, (h, c) = m(x, (h0, c0))
        return y, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0))


def test_ten_training_steps_give_torchs_losses():
    ref, ours = _pair("GRU", 11, torch.float64, input_size=3, hidden_size=6, num_layers=2,
                      batch_first=True, method="newton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 120, 3, generator=g, dtype=torch.float64)
    target = torch.randn(8, 6, generator=g, dtype=torch.float64)
    losses = {}
    for name, model in (("torch", ref), ("paraseq", ours)):
        head = torch.nn.Linear(6, 6).double()
        torch.nn.init.eye_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=0.05)
        out = []
        for _ in range(10):
            opt.zero_grad()
            y, _ = model(x)
            loss = torch.nn.functional.mse_loss(head(y[:, -1]), target)
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[name] = out
    assert losses["torch"][-1] < losses["torch"][0]  # it trains
    for a, b in zip(losses["paraseq"], losses["torch"], strict=True):
        assert abs(a - b) <= 1e-8 * max(1.0, abs(b))


# ----------------------------------------------------------------------------- step


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM", "DiagGRU", "DiagLSTM"])
def test_step_by_step_equals_forward(mode):
    torch.manual_seed(0)
    kw = {"proj_size": 2} if mode == "LSTM" else {}
    m = getattr(pnn, mode)(3, 4, num_layers=2, **kw).double()
    x = torch.randn(25, 2, 3, dtype=torch.float64)
    y, state = m(x)
    s = None
    for t in range(25):
        out, s = m.step(x[t], s)
        assert torch.allclose(out, y[t], rtol=0, atol=1e-12)
    for a, b in zip(s if isinstance(s, tuple) else (s,),
                    state if isinstance(state, tuple) else (state,), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    out, s1 = m.step(x[0, 0])  # unbatched: (Hout,) and a state without the batch dim
    assert out.shape == y[0, 0].shape and torch.allclose(out, y[0, 0], atol=1e-12)
    assert (s1[0] if isinstance(s1, tuple) else s1).shape == (2, out.shape[0])


# ----------------------------------------------------------------------------- compile


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    m = pnn.GRU(3, 5, num_layers=2, bidirectional=True, method="newton").double()
    x = torch.randn(100, 4, 3, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    yc, hc = compiled(x)
    gc = torch.autograd.grad(yc.sum() + hc.sum(), x)[0]
    y, h = m(x)
    g = torch.autograd.grad(y.sum() + h.sum(), x)[0]
    assert torch.allclose(yc, y, atol=1e-12) and torch.allclose(hc, h, atol=1e-12)
    assert torch.allclose(gc, g, atol=1e-12)


def test_import_leaves_dynamo_alone_and_compiled_callers_still_run_the_solver_eagerly():
    """``import paraseq`` does not import torch._dynamo (2.5 s of its import time before);
    under torch.compile the solver still runs eagerly (``paraseq._compile.eager``)."""
    import subprocess
    import sys

    code = "import sys, paraseq, paraseq.nn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True)
    assert out.stdout.strip() == "False"
    import paraseq

    seen = []

    def cell(x, h):
        seen.append(torch.compiler.is_compiling())
        return torch.tanh(h * 0.5 + x)

    def model(x):
        return paraseq.solve_recurrence(cell, x * 2, torch.zeros(2, 3), method="newton") + 1

    x = torch.randn(2, 40, 3)
    torch._dynamo.reset()
    got = torch.compile(model, backend="eager")(x)
    assert seen and not any(seen)  # the cell ran eagerly, inside the solver
    assert torch.allclose(got, model(x), atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_torch_compile_inductor_matches_eager():
    """The default backend (Inductor generates C++ for the input projections and
    concatenations; the solver runs eagerly behind torch.compiler.disable): about 10-20 s on
    a cold cache, most of it Inductor's own compile."""
    torch.manual_seed(0)
    m = pnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, method="newton")
    x = torch.randn(60, 4, 3, requires_grad=True)
    torch._dynamo.reset()
    yc, (hc, cc) = torch.compile(m)(x)
    gc = torch.autograd.grad(yc.sum() + hc.sum() + cc.sum(), x)[0]
    y, (h, c) = m(x)
    g = torch.autograd.grad(y.sum() + h.sum() + c.sum(), x)[0]
    for a, b in ((yc, y), (hc, h), (cc, c), (gc, g)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- diagonal


@pytest.mark.parametrize("mode", ["DiagGRU", "DiagLSTM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_modules_match_their_loop(mode, dtype):
    torch.manual_seed(0)
    seq = getattr(pnn, mode)(3, 6, num_layers=2, bidirectional=True, method="sequential")
    seq = seq.to(dtype)
    # the sequential path is a compiled loop (where numba is present); exact Newton is the
    # elementwise scan for DiagGRU and the 2 x 2 block scan for DiagLSTM
    method = "quasi_newton" if mode == "DiagGRU" else "newton"
    par = getattr(pnn, mode)(3, 6, num_layers=2, bidirectional=True, method=method).to(dtype)
    par.load_state_dict(seq.state_dict())
    assert seq.weight_hh_l0.shape == ((18,) if mode == "DiagGRU" else (24,))
    x = torch.randn(300, 2, 3, dtype=dtype, requires_grad=True)
    _compare(seq, par, x, None, dtype)
    infos = par.last_solve_info
    assert len(infos) == 4 and all(i.converged and not i.fell_back for i in infos)
    assert infos[0].method == ("quasi_newton" if mode == "DiagGRU" else "newton")


class _TimeMajor(torch.nn.Module):
    """A time-major module called with batch_first input: the reference for batch_first."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, hx=None):
        y, h = self.m(x.transpose(0, 1), hx)
        return y.transpose(0, 1), h


class _Batched(torch.nn.Module):
    """A module called on unbatched input through a batch of one: the unbatched reference."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, hx=None):
        hx = None if hx is None else _map_state(hx, lambda t: t.unsqueeze(1))
        y, h = self.m(x.unsqueeze(1), hx)
        return y.squeeze(1), _map_state(h, lambda t: t.squeeze(1))


class _PerSequence(torch.nn.Module):
    """A module run on each sequence of a PackedSequence alone, over its own length: the
    packed reference (no padding anywhere)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, packed, hx):
        x, lengths = pad_packed_sequence(packed)  # (T, B, n), in the caller's batch order
        ys, hs = [], []
        for b, L in enumerate(lengths.tolist()):
            y, h = self.m(x[:L, b:b + 1], _map_state(hx, lambda t, b=b: t[:, b:b + 1]))
            ys.append(torch.nn.functional.pad(y, (0, 0, 0, 0, 0, x.shape[0] - L)))
            hs.append(h)
        y = pack_padded_sequence(torch.cat(ys, dim=1), lengths, enforce_sorted=False)
        h = tuple(torch.cat(p, dim=1) for p in zip(*hs, strict=True)) \
            if isinstance(hx, tuple) else torch.cat(hs, dim=1)
        return y, h


def _map_state(h, f):
    return tuple(f(t) for t in h) if isinstance(h, tuple) else f(h)


@pytest.mark.parametrize("mode", ["DiagGRU", "DiagLSTM"])
@pytest.mark.parametrize("layout", ["packed", "batch_first", "unbatched"])
@DTYPES
def test_diagonal_modules_take_torchs_input_formats_with_hx(mode, layout, dtype):
    """Packed, batch_first and unbatched input, each with a random hx, against the sequential
    module run on plain time-major batches (per sequence for packed), outputs and gradients."""
    kw = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    torch.manual_seed(0)
    seq = getattr(pnn, mode)(**kw, method="sequential").to(dtype)
    method = "quasi_newton" if mode == "DiagGRU" else "newton"
    par = getattr(pnn, mode)(**kw, batch_first=layout == "batch_first", method=method)
    par = par.to(dtype)
    par.load_state_dict(seq.state_dict())
    g = torch.Generator().manual_seed(1)
    T, B = 40, 4
    lead = (4,) if layout == "unbatched" else (4, B)
    h0 = (0.5 * torch.randn(*lead, 5, generator=g, dtype=dtype)).requires_grad_()
    hx = h0
    if mode == "DiagLSTM":
        hx = (h0, (0.5 * torch.randn(*lead, 5, generator=g, dtype=dtype)).requires_grad_())
    if layout == "packed":
        x = torch.randn(T, B, 3, generator=g, dtype=dtype, requires_grad=True)
        inp = pack_padded_sequence(x, torch.tensor([9, 40, 1, 23]), enforce_sorted=False)
        ref = _PerSequence(seq)
    elif layout == "batch_first":
        inp = torch.randn(B, T, 3, generator=g, dtype=dtype, requires_grad=True)
        ref = _TimeMajor(seq)
    else:
        inp = torch.randn(T, 3, generator=g, dtype=dtype, requires_grad=True)
        ref = _Batched(seq)
    _compare(ref, par, inp, hx, dtype)
    _check_path(par, method)


@pytest.mark.parametrize("mode,method", [("DiagGRU", "quasi_newton"), ("DiagLSTM", "newton")])
def test_diagonal_modules_converge_in_a_few_newton_iterations_at_any_length(mode, method):
    """Exact Newton (DiagGRU: its diagonal Jacobian; DiagLSTM: its 2 x 2 blocks) takes the
    same few iterations at any T, the refinement towards FLOOR_TOL included."""
    torch.manual_seed(0)
    m = getattr(pnn, mode)(4, 16, method=method).double()
    for T in (100, 3000, 20000):
        with torch.no_grad():
            m(torch.randn(T, 2, 4, dtype=torch.float64))
        (info,) = m.last_solve_info
        assert info.method == method and info.converged and not info.fell_back
        assert info.iterations <= 8, (T, info.iterations)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ctor,match", [
    (lambda: pnn.GRU(0, 3), "input_size must be greater than zero"),
    (lambda: pnn.GRU(3, 2.5), "hidden_size should be of type int, got: float"),
    (lambda: pnn.GRU(3, 3, num_layers=0), "num_layers must be greater than zero"),
    (lambda: pnn.GRU(3, 3, dropout=1.5), r"dropout should be a number in range \[0, 1\]"),
    (lambda: pnn.RNN(3, 3, nonlinearity="sigmoid"), "Unknown nonlinearity 'sigmoid'"),
    (lambda: pnn.LSTM(3, 3, proj_size=3), "proj_size has to be smaller than hidden_size"),
    (lambda: pnn.GRU(3, 3, method="magic"), "unknown method 'magic'"),
    (lambda: pnn.GRU(3, 3, on_failure="ignore"), "on_failure must be one of"),
    (lambda: pnn.GRU(3, 3, tol=-1.0), "tol must be a positive"),
    (lambda: pnn.GRU(3, 3, max_iter=0), "max_iter must be >= 1"),
    (lambda: pnn.GRU(3, 3, solver="newton"), "unexpected keyword argument"),
])
def test_bad_constructor_arguments(ctor, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ctor()


def test_bad_forward_arguments():
    m = pnn.LSTM(3, 4, num_layers=2)
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 1D"):
        m(torch.randn(5))
    with pytest.raises(ValueError,
                       match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 4"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError,
                       match=r"RNN input dtype \(torch.float64\) does not match weight dtype"):
        m(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="tuple"):
        m(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 4\)"):
        m(torch.randn(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError,
                       match="For unbatched 2-D input, hx and cx should also be 2-D"):
        m(torch.randn(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)))
    with pytest.raises(ValueError, match="bidirectional"):
        pnn.GRU(3, 4, bidirectional=True).step(torch.randn(2, 3))


def test_dropout_with_one_layer_warns_as_torch_does():
    with pytest.warns(UserWarning, match="dropout"):
        pnn.GRU(3, 4, dropout=0.2)


def test_module_defaults_are_tighter_than_the_solver():
    from paraseq.solve.api import DEFAULT_TOL as SOLVE_TOL
    for dtype, tol in pnn.rnn.DEFAULT_TOL.items():
        assert tol <= SOLVE_TOL[dtype]
        assert pnn.rnn.FLOOR_TOL.get(dtype, 0) < tol
    assert math.isclose(pnn.rnn.DEFAULT_TOL[torch.float32], 1e-6)


def test_refinement_past_the_acceptance_tolerance():
    """The audit's case: a residual just under 1e-6 left quasi_newton's float32 outputs
    1.09e-5 from torch.nn's (the recurrence amplifies the residual). With tol=None each
    solve is refined towards FLOOR_TOL; with an explicit tol it stops at that tol."""
    ref, ours = _pair("LSTM", 7, torch.float32, input_size=3, hidden_size=4, num_layers=2,
                      bidirectional=True, proj_size=2, method="quasi_newton")
    x = torch.randn(71, 3, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(x)[0]
        assert _rel(ours(x)[0], want) < 2e-6
        refined = ours.last_solve_info
        ours.tol = 1e-6
        ours(x)
        plain = ours.last_solve_info
    assert all(i.converged and i.residual <= 1e-6 for i in refined + plain)
    assert all(r.residual < p.residual and r.iterations > p.iterations
               for r, p in zip(refined, plain, strict=True))
    for r, p in zip(refined[:2], plain[:2], strict=True):  # layer 0: the same first solve
        assert r.residuals[:len(p.residuals)] == p.residuals


# ----------------------------------------------------------------------------- example


def test_adding_problem_example_runs_and_curves_agree(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "adding_problem.py"
    spec = importlib.util.spec_from_file_location("adding_problem", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png = tmp_path / "adding.png"
    rc = mod.main(["--length", "120", "--steps", "4", "--batch", "4", "--method", "newton",
                   "--dtype", "float64", "--out", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diff = float(out.split("loss curves:")[1].split()[0])
    assert diff < 1e-10
    assert "parallel (newton)" in out and "speedup" in out


def test_empty_batch_and_empty_sequence():
    m = pnn.GRU(3, 4, num_layers=2, method="newton")
    y, h = m(torch.randn(5, 0, 3))
    assert y.shape == (5, 0, 4) and h.shape == (2, 0, 4)
    with pytest.raises(ValueError, match="Expected sequence length to be larger than 0"):
        m(torch.randn(0, 2, 3))


@pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("mode,nonlin", [("GRU", None), ("RNN", "tanh"), ("RNN", "relu"),
                                         ("LSTM", None)])
def test_newton_runs_as_compiled_sweeps_and_matches_the_generic_loop(mode, nonlin, monkeypatch):
    """method="newton" on the CPU GRU/RNN/LSTM modules runs paraseq.cells.newton's sweeps (its
    SolveInfo says so); with rnn.NEWTON_SWEEPS off it runs solve_recurrence. Both give torch's
    outputs and gradients, packed and bidirectional, with h0 (and c0)."""
    from paraseq.nn import rnn

    kw = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, batch_first=True)
    if nonlin:
        kw["nonlinearity"] = nonlin
    ref, ours = _pair(mode, 3, torch.float64, method="newton", **kw)
    x = torch.randn(4, 90, 3, dtype=torch.float64)
    hx = 0.3 * torch.randn(4, 4, 5, dtype=torch.float64)
    if mode == "LSTM":
        hx = (hx, 0.3 * torch.randn(4, 4, 5, dtype=torch.float64))
    lengths = torch.tensor([90, 71, 40, 3])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    for inp in (x, packed):
        _compare(ref, ours, inp, hx, torch.float64)
        infos = ours.last_solve_info
        assert len(infos) == 4 and ours.last_path == "parallel (newton)"
        assert all(i.jacobian == "analytic (compiled sweep)" and i.converged for i in infos)
        assert all(i.residual <= 1e-12 for i in infos)
    monkeypatch.setattr(rnn, "NEWTON_SWEEPS", False)
    _compare(ref, ours, x, hx, torch.float64)
    assert all(i.jacobian == "analytic" for i in ours.last_solve_info)


def test_lstm_with_proj_size_keeps_the_generic_newton():
    """The sweeps have no projection: a projected LSTM's newton goes through solve_recurrence,
    with torch's numbers."""
    ref, ours = _pair("LSTM", 4, torch.float64, input_size=3, hidden_size=5, proj_size=2,
                      method="newton")
    x = torch.randn(60, 2, 3, dtype=torch.float64)
    _compare(ref, ours, x, None, torch.float64)
    assert all(i.jacobian == "analytic" for i in ours.last_solve_info)


@pytest.mark.parametrize("method", ["auto", "newton"])
@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_nan_input_gives_nan_where_torch_does(mode, method):
    """A nan in the input is never returned as a finite state (nor a solve reported
    converged): the outputs are nan exactly where torch.nn's are."""
    ref, ours = _pair(mode, 1, torch.float32, input_size=2, hidden_size=4, method=method)
    x = torch.randn(300, 3, 2)
    x[100, 1, 0] = float("nan")
    with torch.no_grad():
        y, _ = ours(x)
        yr, _ = ref(x)
    assert torch.equal(y.isnan(), yr.isnan()) and bool(y[100:, 1].isnan().all())
    if ours.last_solve_info:
        assert not any(i.converged for i in ours.last_solve_info)


@pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")
def test_newton_sweeps_honour_tol_max_iter_and_on_failure():
    """The modules' solver options reach the sweeps: an explicit tol is the acceptance rule
    (no refinement), max_iter caps the sweeps, and on_failure decides what a cap does."""
    from paraseq import ConvergenceError

    torch.manual_seed(0)
    x = torch.randn(400, 2, 3)
    m = pnn.GRU(3, 6, method="newton", tol=1e-3)
    with torch.no_grad():
        m(x)
    (info,) = m.last_solve_info
    assert info.jacobian == "analytic (compiled sweep)"
    assert info.tol == 1e-3 and info.converged and info.residual <= 1e-3
    assert len(info.residuals) == info.iterations + 1
    m = pnn.GRU(3, 6, method="newton", max_iter=1, on_failure="raise")
    with pytest.raises(ConvergenceError), torch.no_grad():
        m(x)
    m = pnn.GRU(3, 6, method="newton", max_iter=1)  # on_failure="fallback": the loop finishes
    ref = torch.nn.GRU(3, 6)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        y, _ = m(x)
        yr, _ = ref(x)
    (info,) = m.last_solve_info
    assert info.iterations == 1 and info.fell_back and m.last_path.startswith(
        "parallel (newton), fell back at t=")
    assert float((y - yr).abs().max()) < 1e-5
