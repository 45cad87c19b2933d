"""paraseq.nn.RNN/GRU/LSTM against torch.nn's modules (the reference), and the diagonal-
recurrence modules against their own sequential loop.

Parity means: outputs to 1e-5 relative (float32) / 1e-10 (float64), gradients with respect to
the input, hx and every parameter to 1e-4 / 1e-8, for every method.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import paraseq.nn as pnn
from paraseq.cells import compiled
from paraseq.solve.methods import METHODS

ALL_METHODS = ["auto", *METHODS]
OUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}


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


def _compare(ref, ours, x, hx, dtype, check_grad=True):
    leaves = [t for t in ([x] + (list(hx) if isinstance(hx, tuple) else [hx]))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    r = _flat(ref(x, hx))
    o = _flat(ours(x, hx))
    for a, b in zip(o, r, strict=True):
        assert a.shape == b.shape
        assert _rel(a, b) <= OUT_TOL[dtype], _rel(a, b)
    if not check_grad:
        return
    torch.manual_seed(123)
    weights = [torch.randn_like(t) for t in r]
    gr = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, r, strict=True)),
                             leaves + list(ref.parameters()))
    go = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, o, strict=True)),
                             leaves + list(ours.parameters()))
    for a, b in zip(go, gr, strict=True):
        assert _rel(a, b) <= GRAD_TOL[dtype], _rel(a, b)


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["RNN", "GRU", "LSTM"]),
       nonlinearity=st.sampled_from(["tanh", "relu"]),
       num_layers=st.integers(1, 2), bidirectional=st.booleans(), batch_first=st.booleans(),
       bias=st.booleans(), proj=st.booleans(), T=st.sampled_from([1, 2, 17, 40, 71]),
       B=st.integers(1, 3), unbatched=st.booleans(), with_hx=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       method=st.sampled_from(ALL_METHODS), seed=st.integers(0, 2**16))
def test_parity_with_torch(mode, nonlinearity, num_layers, bidirectional, batch_first, bias,
                           proj, T, B, unbatched, with_hx, dtype, method, seed):
    H, n = 4, 3
    kw = dict(input_size=n, hidden_size=H, num_layers=num_layers, bias=bias,
              batch_first=batch_first, bidirectional=bidirectional, method=method)
    if mode == "RNN":
        kw["nonlinearity"] = nonlinearity
    if mode == "LSTM" and proj:
        kw["proj_size"] = 2
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


@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("method", ["newton", "quasi_newton", "sequential"])
def test_packed_sequences_match_torch(mode, method):
    dtype = torch.float64
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, method=method)
    if mode == "LSTM":
        kw["proj_size"] = 2
    ref, ours = _pair(mode, 3, dtype, **kw)
    T, lengths = 90, torch.tensor([7, 90, 33, 1, 90])
    x = torch.randn(T, 5, 3, dtype=dtype)
    x_req = x.clone().requires_grad_()
    packed = pack_padded_sequence(x_req, lengths, enforce_sorted=False)
    hout = 2 if mode == "LSTM" else 4
    h0 = torch.randn(4, 5, hout, dtype=dtype).requires_grad_()
    hx = (h0, torch.randn(4, 5, 4, dtype=dtype).requires_grad_()) if mode == "LSTM" else h0
    _compare(ref, ours, packed, hx, dtype)
    y = ours(packed, hx)[0]
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(y.batch_sizes, packed.batch_sizes)
    assert torch.equal(y.unsorted_indices, packed.unsorted_indices)


def test_padding_never_changes_valid_positions():
    torch.manual_seed(0)
    m = pnn.GRU(2, 3, bidirectional=True, method="newton").double()
    lengths = torch.tensor([80, 5, 66])
    x = torch.randn(80, 3, 2, dtype=torch.float64)
    y1, h1 = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
    x2 = x.clone()
    for b, L in enumerate(lengths):
        x2[L:, b] = 1e3 * torch.randn(80 - L, 2, dtype=torch.float64)
    y2, h2 = m(pack_padded_sequence(x2, lengths, enforce_sorted=False))
    assert torch.allclose(y1.data, y2.data, rtol=0, atol=1e-12)
    assert torch.allclose(h1, h2, rtol=0, atol=1e-12)


def test_dropout_between_layers_matches_torch_in_training():
    ref, ours = _pair("GRU", 1, torch.float64, input_size=3, hidden_size=5, num_layers=3,
                      dropout=0.5, bidirectional=True, method="newton")
    x = torch.randn(100, 4, 3, dtype=torch.float64)
    torch.manual_seed(5)
    yr, hr = ref(x)
    torch.manual_seed(5)
    y, h = ours(x)
    assert _rel(y, yr) < 1e-10 and _rel(h, hr) < 1e-10
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
    if mode == "GRU" and compiled.AVAILABLE:  # small B H: the compiled loop
        assert ours.last_path == "compiled loop" and ours.last_solve_info == []
    else:
        assert ours.last_solve_info and ours.last_solve_info[0].method == "newton"
        assert all(i.converged and not i.fell_back for i in ours.last_solve_info)
        assert ours.last_path == "parallel (newton)"
    ours(x[:30])
    assert ours.last_solve_info == []  # short: a loop
    assert ours.last_path in ("torch kernel", "compiled loop")


@pytest.mark.parametrize("batch_first", [False, True])
def test_gru_sequential_paths_both_match_torch(batch_first):
    """Wide (B H > 256): torch's kernel; narrow: the compiled loop (where numba is present)."""
    for B, H in ((40, 8), (2, 8)):
        ref, ours = _pair("GRU", B, torch.float64, input_size=3, hidden_size=H, num_layers=2,
                          bidirectional=True, batch_first=batch_first, method="sequential")
        x = torch.randn((B, 50, 3) if batch_first else (50, B, 3), dtype=torch.float64,
                        requires_grad=True)
        _compare(ref, ours, x, None, torch.float64)
        narrow = B * H <= 256 and compiled.AVAILABLE
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


# ----------------------------------------------------------------------------- diagonal


@pytest.mark.parametrize("mode", ["DiagGRU", "DiagLSTM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagonal_modules_match_their_loop(mode, dtype):
    torch.manual_seed(0)
    seq = getattr(pnn, mode)(3, 6, num_layers=2, bidirectional=True, method="sequential")
    seq = seq.to(dtype)
    method = "quasi_newton" if mode == "DiagGRU" else "auto"  # auto: the compiled loop
    par = getattr(pnn, mode)(3, 6, num_layers=2, bidirectional=True, method=method).to(dtype)
    par.load_state_dict(seq.state_dict())
    assert seq.weight_hh_l0.shape == ((18,) if mode == "DiagGRU" else (24,))
    x = torch.randn(300, 2, 3, dtype=dtype, requires_grad=True)
    _compare(seq, par, x, None, dtype)
    infos = par.last_solve_info
    assert len(infos) == 4 and all(i.converged and not i.fell_back for i in infos)
    assert infos[0].method == ("quasi_newton" if mode == "DiagGRU" else "newton")


def test_diag_gru_converges_in_a_few_newton_iterations_at_any_length():
    torch.manual_seed(0)
    m = pnn.DiagGRU(4, 16, method="quasi_newton").double()  # exact Newton for it
    for T in (100, 3000, 20000):
        with torch.no_grad():
            m(torch.randn(T, 2, 4, dtype=torch.float64))
        (info,) = m.last_solve_info
        assert info.method == "quasi_newton" and info.converged
        assert info.iterations <= 8, (T, info.iterations)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("ctor,match", [
    (lambda: pnn.GRU(0, 3), "input_size must be >= 1"),
    (lambda: pnn.GRU(3, 2.5), "hidden_size must be an int"),
    (lambda: pnn.GRU(3, 3, num_layers=0), "num_layers must be >= 1"),
    (lambda: pnn.GRU(3, 3, dropout=1.5), "dropout must be a number in"),
    (lambda: pnn.RNN(3, 3, nonlinearity="sigmoid"), "nonlinearity must be"),
    (lambda: pnn.LSTM(3, 3, proj_size=3), "proj_size must be smaller"),
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
    with pytest.raises(ValueError, match="input must be 3-D"):
        m(torch.randn(5))
    with pytest.raises(ValueError, match="input_size=3"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="dtype"):
        m(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="tuple"):
        m(torch.randn(5, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"h_0 must have shape \(2, 2, 4\)"):
        m(torch.randn(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="2-D"):
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
    assert math.isclose(pnn.rnn.DEFAULT_TOL[torch.float32], 1e-6)


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
    with pytest.raises(ValueError, match="at least one time step"):
        m(torch.randn(0, 2, 3))
