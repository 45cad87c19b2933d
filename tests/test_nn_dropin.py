"""paraseq.nn as a drop-in for torch.nn's recurrent modules, beyond the numbers (issue 13):
torch's errors in torch's words, an empty batch that backpropagates, instances of torch's own
classes, double backward and batched gradients through every path; and the path table of
``paraseq.nn._paths`` (issue 14) against the rule it replaced."""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import paraseq.nn as pnn
from paraseq.cells import compiled
from paraseq.nn import _paths, rnn
from paraseq.solve.api import choose_method
from paraseq.solve.cell import FlatCell, StateLayout

TORCH = {"RNN": torch.nn.RNN, "GRU": torch.nn.GRU, "LSTM": torch.nn.LSTM}
PARASEQ = {"RNN": pnn.RNN, "GRU": pnn.GRU, "LSTM": pnn.LSTM}


def _raised(fn):
    try:
        fn()
    except Exception as e:  # the point is to catch whatever torch raises
        return e
    raise AssertionError("no exception raised")


# ----------------------------------------------------------------------------- errors

CTOR_MISTAKES = [
    ("GRU", (10, 0, 1), {}),  # hidden_size 0
    ("GRU", (10, 10, 0), {}),  # num_layers 0
    ("LSTM", (3, -1), {}),
    ("RNN", (3, 5.0), {}),
    ("GRU", (3.0, 5), {}),
    ("GRU", ("10", 5), {}),
    ("LSTM", (0, 5), {}),
    ("GRU", (3, 5), {"bias": 0}),
    ("RNN", (3, 5), {"bias": "True"}),
    ("LSTM", (3, 5), {"batch_first": 1}),
    ("GRU", (3, 5), {"dropout": 1.5}),
    ("GRU", (3, 5), {"dropout": True}),
    ("GRU", (30, 20, 2), {"proj_size": 10}),
    ("RNN", (30, 20, 2), {"proj_size": 10}),
    ("LSTM", (3, 4), {"proj_size": -1}),
    ("LSTM", (3, 4), {"proj_size": 4}),
    ("RNN", (3, 4), {"nonlinearity": "sigmoid"}),
]


@pytest.mark.parametrize("kind,args,kwargs", CTOR_MISTAKES)
def test_constructor_mistakes_raise_what_torch_raises_in_its_words(kind, args, kwargs):
    want = _raised(lambda: TORCH[kind](*args, **kwargs))
    got = _raised(lambda: PARASEQ[kind](*args, **kwargs))
    assert isinstance(got, type(want)), (got, want)
    assert str(want) in str(got), (str(got), str(want))
    assert len(str(got)) > len(str(want))  # paraseq's hint follows torch's words


def test_unknown_keyword_and_proj_size_on_the_diagonal_modules():
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'solver'"):
        pnn.GRU(3, 4, solver="newton")
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        pnn.DiagGRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="DiagLSTM: proj_size is not supported"):
        pnn.DiagLSTM(3, 4, proj_size=2)


def test_dropout_warning_in_torchs_words():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        pnn.LSTM(3, 4, dropout=0.5)


def _forward_mistakes(kind):
    lstm = kind == "LSTM"

    def hx(h, c=None):
        return (h, c if c is not None else torch.zeros(1, 2, 4)) if lstm else h

    return [
        ("hx batch", torch.randn(5, 2, 3), hx(torch.randn(1, 3, 4))),
        ("hx layers", torch.randn(5, 2, 3), hx(torch.randn(2, 2, 4))),
        ("hx size", torch.randn(5, 2, 3), hx(torch.randn(1, 2, 5))),
        ("hx dims", torch.randn(5, 2, 3), hx(torch.randn(2, 4), torch.randn(2, 4))),
        ("unbatched hx dims", torch.randn(5, 3), hx(torch.randn(1, 2, 4))),
        ("input size", torch.randn(5, 2, 4), None),
        ("input dims", torch.randn(5, 2, 3, 1), None),
        ("length 0", torch.randn(0, 2, 3), None),
        ("input dtype", torch.randn(5, 2, 3, dtype=torch.float64), None),
    ] + ([("cell size", torch.randn(5, 2, 3), (torch.randn(1, 2, 4), torch.randn(1, 2, 5)))]
         if lstm else [])


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_forward_mistakes_raise_what_torch_raises_in_its_words(kind):
    ref, mod = TORCH[kind](3, 4), PARASEQ[kind](3, 4)
    for label, x, hx in _forward_mistakes(kind):
        want = _raised(lambda: ref(x, hx))  # noqa: B023 - called at once
        got = _raised(lambda: mod(x, hx))  # noqa: B023
        assert isinstance(got, type(want)), (label, got, want)
        # torch's word "RNN"/"GRU" prefix is the class name; paraseq's class has the same one
        assert str(want) in str(got), (label, str(got), str(want))
        if isinstance(want, RuntimeError):
            assert isinstance(got, ValueError), label  # paraseq's contract kept
            assert isinstance(got, pnn.RNNInputError)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_mismatched_hx_dtype_is_a_runtime_error_as_in_torch(kind):
    ref, mod = TORCH[kind](3, 4), PARASEQ[kind](3, 4)
    h = torch.randn(1, 2, 4, dtype=torch.float64)
    hx = (h, torch.randn(1, 2, 4)) if kind == "LSTM" else h
    x = torch.randn(5, 2, 3)
    assert isinstance(_raised(lambda: ref(x, hx)), RuntimeError)
    with pytest.raises(RuntimeError, match=r"Expected hx dtype to match input dtype"):
        mod(x, hx)
    with pytest.raises(ValueError):
        mod(x, hx)


# ----------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("make", [lambda: pnn.GRU(3, 4, num_layers=2),
                                  lambda: pnn.LSTM(3, 4, bidirectional=True, method="newton"),
                                  lambda: pnn.RNN(3, 4, method="quasi_newton"),
                                  lambda: pnn.DiagGRU(3, 4), lambda: pnn.DiagLSTM(3, 4)])
def test_an_empty_batch_backpropagates_as_in_torch(make):
    m = make()
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, hn = m(x)
    h = hn[0] if isinstance(hn, tuple) else hn
    assert out.shape == (5, 0, m._dirs * m.hidden_size) and h.shape[1] == 0
    (out.sum() + h.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    with torch.no_grad():
        assert not m(x)[0].requires_grad


# ----------------------------------------------------------------------------- torch's classes


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_the_dense_modules_are_instances_of_torchs_classes(kind):
    kw = {"proj_size": 2} if kind == "LSTM" else {}
    m = PARASEQ[kind](3, 4, num_layers=2, bidirectional=True, **kw)
    assert isinstance(m, TORCH[kind]) and isinstance(m, torch.nn.RNNBase)
    ref = TORCH[kind](3, 4, num_layers=2, bidirectional=True, **kw)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert m._flat_weights_names == ref._flat_weights_names
    m.load_state_dict(ref.state_dict())
    x = torch.randn(7, 2, 3)
    torch.testing.assert_close(m(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    # torch's own machinery runs on them: flat weights follow assignment, pickling, copies,
    # .to(), an initialisation scheme that dispatches on torch's class
    w = torch.nn.Parameter(torch.zeros_like(m.weight_hh_l0))
    m.weight_hh_l0 = w
    assert m._flat_weights[1] is w
    m.flatten_parameters()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x)[0], m(x)[0])
        assert isinstance(clone, TORCH[kind])
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], m(x)[0])
    m64 = m.to(torch.float64)
    assert all(w.dtype == torch.float64 for w in m64._flat_weights)
    for mod in m64.modules():
        if isinstance(mod, torch.nn.RNNBase):
            for name, p in mod.named_parameters():
                if "weight_hh" in name:
                    torch.nn.init.orthogonal_(p)
    m64(x.double())


def test_the_diagonal_modules_are_not_torch_rnns_but_keep_the_surface():
    for m in (pnn.DiagGRU(3, 4, num_layers=2), pnn.DiagLSTM(3, 4)):
        assert not isinstance(m, torch.nn.RNNBase)
        assert len(m._flat_weights) == len(m._flat_weights_names)
        m.flatten_parameters()
        clone = pickle.loads(pickle.dumps(m))
        x = torch.randn(6, 2, 3)
        torch.testing.assert_close(clone(x)[0], m(x)[0])


# ----------------------------------------------------------------------------- gradients

# (label, constructor, expected last_path prefix, jacobian note)
PATH_CASES = [
    ("torch kernel", lambda: pnn.GRU(2, 3, method="sequential"), "torch kernel"),
    ("compiled loop GRU", lambda: pnn.GRU(2, 3, method="sequential"), "compiled loop"),
    ("compiled loop LSTM", lambda: pnn.LSTM(2, 3, method="sequential"), "compiled loop"),
    ("newton sweeps RNN", lambda: pnn.RNN(2, 3, method="newton"), "parallel (newton)"),
    ("newton sweeps LSTM", lambda: pnn.LSTM(2, 3, method="newton"), "parallel (newton)"),
    ("solve GRU", lambda: pnn.GRU(2, 3, method="quasi_newton"), "parallel (quasi_newton)"),
    ("solve LSTM proj", lambda: pnn.LSTM(2, 3, proj_size=2, method="newton"),
     "parallel (newton)"),
    ("DiagGRU solve", lambda: pnn.DiagGRU(2, 3, method="quasi_newton"),
     "parallel (quasi_newton)"),
    ("DiagLSTM compiled", lambda: pnn.DiagLSTM(2, 3), "compiled loop"),
]


def _setup(label, make, path, monkeypatch):
    if label == "torch kernel":
        monkeypatch.setattr(_paths, "COMPILED_LOOPS", {})
    elif ("compiled" in label or "sweeps" in label) and not compiled.AVAILABLE:
        pytest.skip("numba is not installed")
    torch.manual_seed(0)
    m = make().double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)  # (T, B, n)
    h0 = torch.randn(m._dirs * m.num_layers, 2, m._hout, dtype=torch.float64,
                     requires_grad=True)

    def f(x, h0, *ps):
        hx = (h0, torch.zeros(1, 2, m.hidden_size, dtype=torch.float64)) \
            if m.mode == "LSTM" else h0
        out, hn = functional_call(m, dict(zip(names, ps, strict=True)), (x, hx))
        hn = hn[0] if isinstance(hn, tuple) else hn
        return out, hn

    f(x, h0, *params)
    assert m.last_path.startswith(path), (label, m.last_path)
    if "sweeps" in label:
        assert "compiled sweep" in m.last_solve_info[0].jacobian
    return m, f, (x, h0, *params)


@pytest.mark.parametrize("label,make,path", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_double_backward_and_batched_gradients_on_every_path(label, make, path, monkeypatch):
    _, f, inputs = _setup(label, make, path, monkeypatch)
    assert gradcheck(f, inputs, check_batched_grad=True)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("label,make,path", [c for c in PATH_CASES if "Diag" not in c[0]],
                         ids=[c[0] for c in PATH_CASES if "Diag" not in c[0]])
def test_a_gradient_penalty_equals_torchs(label, make, path, monkeypatch):
    """The gradient of ||d loss / d x||^2 with respect to every weight, paraseq's against
    torch.nn's module with the same weights (float64)."""
    m, _, _ = _setup(label, make, path, monkeypatch)
    kind = type(m).__name__
    kw = {"proj_size": m.proj_size} if m.proj_size else {}
    if kind == "RNN":
        kw["nonlinearity"] = m.nonlinearity
    ref = TORCH[kind](2, 3, **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    grads = []
    for mod in (m, ref):
        out = mod(x)[0]
        (gx,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
        penalty = (gx ** 2).sum()
        grads.append(torch.autograd.grad(penalty, list(mod.parameters())))
    assert m.last_path.startswith(path)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_double_backward_through_layers_directions_and_packing():
    torch.manual_seed(1)
    m = pnn.GRU(2, 3, num_layers=2, bidirectional=True, method="newton").double()
    ref = torch.nn.GRU(2, 3, num_layers=2, bidirectional=True).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 6, 2, dtype=torch.float64, requires_grad=True)  # (B, T, n)
    lengths = torch.tensor([6, 4, 2])
    grads = []
    for mod in (m, ref):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                         enforce_sorted=False)
        out, hn = mod(packed)
        loss = (out.data ** 2).sum() + (hn ** 2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        grads.append(torch.autograd.grad(gx.pow(2).sum(), list(mod.parameters())))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["RNN", "GRU", "LSTM"]),
       method=st.sampled_from(["auto", "sequential", "newton", "quasi_newton", "jacobi"]),
       T=st.integers(1, 13), B=st.integers(1, 3), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), with_h0=st.booleans())
def test_second_order_gradients_equal_torchs(kind, method, T, B, layers, bidirectional,
                                             batch_first, with_h0):
    """d/dθ of ||d loss / d (x, h0)||^2, paraseq's against torch.nn's over drawn shapes,
    lengths, stacks and methods (float64; tol at the rounding floor)."""
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    torch.manual_seed(T * 100 + B)
    ref = TORCH[kind](2, 3, **kw).double()
    m = PARASEQ[kind](2, 3, method=method, **kw).double()
    m.load_state_dict(ref.state_dict())
    shape = (B, T, 2) if batch_first else (T, B, 2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    D = layers * (2 if bidirectional else 1)
    h0 = torch.randn(D, B, 3, dtype=torch.float64, requires_grad=True) if with_h0 else None
    grads = []
    for mod in (m, ref):
        hx = None if h0 is None else ((h0, torch.zeros_like(h0)) if kind == "LSTM" else h0)
        out, hn = mod(x, hx)
        hn = hn[1] if kind == "LSTM" else hn  # c_n for LSTM
        wrt = [x] if h0 is None else [x, h0]
        g = torch.autograd.grad((out.tanh() ** 2).sum() + (hn ** 3).sum(), wrt,
                                create_graph=True)
        penalty = sum((gi ** 2).sum() for gi in g)
        grads.append(torch.autograd.grad(penalty, [*mod.parameters(), *wrt]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_a_plain_backward_still_runs_the_paths_own_adjoint(monkeypatch):
    """Without create_graph, the backward is the fast path's own (the replay is not called)."""
    calls = []
    orig = rnn._RNNBase._replay_direction

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(rnn._RNNBase, "_replay_direction", spy)
    m = pnn.GRU(2, 3, method="quasi_newton")
    x = torch.randn(20, 2, 2, requires_grad=True)
    m(x)[0].sum().backward()
    assert not calls
    out = m(x)[0]
    torch.autograd.grad(out.sum(), x, create_graph=True)
    assert calls


# ----------------------------------------------------------------------------- the path table


def _old_rule(m, x, T, B, training):
    """The rule as it stood before the table (rnn.py's _resolve_method and _compiled_pays with
    solve.choose_method), rebuilt here to hold the table to it."""
    def pays():
        if _paths.compiled_loop(m.mode) is None or not compiled.supported(x):
            return False
        return m._diagonal or rnn._compiled_beats_torch(m.mode, B, m.hidden_size, training)

    if m.method != "auto":
        method = m.method
    elif pays():
        method = "sequential"
    else:
        fc = FlatCell(m._cell(0, 0), StateLayout(m.mode == "LSTM", m._state_sizes()))
        method = choose_method(T, B, sum(m._state_sizes()), fc, x.device, training,
                               training_factor=8 if m._diagonal else 2)
    if method == "sequential" and pays():
        method = "compiled"
    return method


def test_the_path_table_gives_the_old_rules_answers():
    assert len(_paths.PATHS) >= 5 and all(p.measured_by.startswith("python benchmarks/")
                                          for p in _paths.PATHS)
    makers = [lambda H: pnn.GRU(2, H), lambda H: pnn.RNN(2, H, nonlinearity="relu"),
              lambda H: pnn.LSTM(2, H), lambda H: pnn.LSTM(2, H + 1, proj_size=1),
              lambda H: pnn.DiagGRU(2, H), lambda H: pnn.DiagLSTM(2, H),
              lambda H: pnn.GRU(2, H, method="sequential"),
              lambda H: pnn.LSTM(2, H, method="quasi_newton")]
    seen = set()
    for make in makers:
        for H in (1, 2, 8, 32, 200):
            m = make(H)
            for dtype in (torch.float32, torch.float64, torch.float16):
                for T in (10, 64, 65, 1000):
                    for B in (1, 16, 64, 512):
                        for training in (False, True):
                            x = torch.zeros(1, 1, 2, dtype=dtype)
                            got = m._choose(x, T, B, training)
                            assert got == _old_rule(m, x, T, B, training), \
                                (type(m).__name__, H, dtype, T, B, training)
                            seen.add(_paths.label(got, m._diagonal))
    assert {"torch kernel", "loop", "parallel (newton)", "parallel (quasi_newton)"} <= seen
    if compiled.AVAILABLE:
        assert "compiled loop" in seen


def test_last_path_reads_the_tables_labels():
    m = pnn.GRU(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(torch.randn(100, 1, 2))
    labels = {p.label for p in _paths.PATHS}
    assert m.last_path in labels or re.sub(r", fell back.*", "", m.last_path) in labels


@pytest.mark.parametrize("method", ["auto", "quasi_newton"])
def test_torchs_weight_parametrizations_and_pruning_apply(method):
    """Utilities written for torch.nn.GRU (a parametrization swaps the module's class, pruning
    replaces a Parameter by a plain tensor attribute) change paraseq's module as torch's."""
    from torch.nn.utils import parametrizations, prune

    torch.manual_seed(0)
    m = pnn.GRU(3, 4, method=method).double()
    ref = torch.nn.GRU(3, 4).double()
    ref.load_state_dict(m.state_dict())
    for mod in (m, ref):
        parametrizations.weight_norm(mod, "weight_hh_l0")
        prune.l1_unstructured(mod, "weight_ih_l0", amount=0.3)
        assert isinstance(mod, torch.nn.GRU)
    x = torch.randn(80, 2, 3, dtype=torch.float64)
    outs = [mod(x)[0] for mod in (m, ref)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=1e-9)
    for out in outs:
        out.sum().backward()
    torch.testing.assert_close(m.parametrizations.weight_hh_l0.original1.grad,
                               ref.parametrizations.weight_hh_l0.original1.grad,
                               atol=1e-9, rtol=1e-8)
    torch.testing.assert_close(m.weight_ih_l0_orig.grad, ref.weight_ih_l0_orig.grad,
                               atol=1e-9, rtol=1e-8)
