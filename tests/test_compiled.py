"""The compiled loops (paraseq.cells.compiled) against the cell equations run step by step.

The references are paraseq.cells.functional's cells (torch's equations) in a Python loop over
T, differentiated by autograd. Both kernels (lanes: vectors over the batch; rows: vectors over
the units) and the strided reads are exercised: the batch size decides the kernel (``_plan``),
the layout of gi the strides. The first run in a fresh checkout compiles the kernels (about a
minute, then numba's on-disk cache).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from paraseq.cells import compiled
from paraseq.cells import functional as CF

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="numba is not installed")

GATES = {"gru": 3, "tanh": 1, "relu": 1, "lstm": 4}
DTYPES = [torch.float32, torch.float64]


def _loop(cell, gi, h0, c0, w, b, whr):
    """The reference: the functional cell step by step; (B, T, P) (LSTM: and c (B, T, H))."""
    h, c, hs, cs = h0, c0, [], []
    for t in range(gi.shape[1]):
        if cell == "gru":
            h = CF._gru_gated(gi[:, t], h, w, b)[0]
        elif cell == "lstm":
            m, c = CF._lstm_gated(gi[:, t], h, c, w, b)[:2]
            h = m if whr is None else F.linear(m, whr)
            cs.append(c)
        else:
            pre = gi[:, t] + CF._recurrent(h, w, b, 1)
            h = torch.tanh(pre) if cell == "tanh" else torch.relu(pre)
        hs.append(h)
    return (torch.stack(hs, 1), torch.stack(cs, 1)) if cell == "lstm" else torch.stack(hs, 1)


def _compiled(cell, gi, h0, c0, w, b, whr):
    if cell == "gru":
        return compiled.gru_sequence(gi, h0, w, b)
    if cell == "lstm":
        return compiled.lstm_sequence(gi, h0, c0, w, b, whr)
    return compiled.elman_sequence(gi, h0, w, b, cell)


def _layout(gi, layout):
    """The same values (B, T, K) in another memory layout: torch's (T, B, K) (what F.linear
    gives a layer), batch-contiguous (K, T, B), or a non-dense slice."""
    if layout == "TBK":
        return gi.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "KTB":
        return gi.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    if layout == "slice":
        return torch.cat([gi, gi], dim=-1)[..., :gi.shape[-1]]
    return gi


def _problem(cell, B, T, H, P, diag, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    K = GATES[cell] * H

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()

    gi = rnd(B, T, K)
    h0 = rnd(B, P)
    c0 = rnd(B, H) if cell == "lstm" else None
    w = rnd(K, scale=0.6) if diag else rnd(K, P, scale=0.9 / P ** 0.5)
    b = rnd(K) if bias else None
    whr = rnd(P, H, scale=1 / H ** 0.5) if P != H else None
    return gi, h0, c0, w, b, whr


def _check_against_loop(cell, B, T, H, P, diag, bias, dtype, layout, seed):
    gi, h0, c0, w, b, whr = _problem(cell, B, T, H, P, diag, bias, dtype, seed)
    leaves = [t for t in (gi, h0, c0, w, b, whr) if t is not None]
    out = _compiled(cell, _layout(gi, layout), h0, c0, w, b, whr)
    ref = _loop(cell, gi, h0, c0, w, b, whr)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    f64 = dtype == torch.float64
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == dtype and o.shape == r.shape
        scale = 1 + r.detach().abs().max().item()
        assert (o - r).abs().max().item() <= (1e-12 if f64 else 2e-6) * scale
    g = torch.Generator().manual_seed(seed + 1)
    wts = [torch.randn(r.shape, generator=g, dtype=dtype) for r in ref]
    g1 = torch.autograd.grad(sum((o * v).sum() for o, v in zip(out, wts, strict=True)), leaves)
    g2 = torch.autograd.grad(sum((r * v).sum() for r, v in zip(ref, wts, strict=True)), leaves)
    for a, c in zip(g1, g2, strict=True):
        scale = 1 + c.abs().max().item()
        assert (a - c).abs().max().item() <= (1e-10 if f64 else 2e-5) * scale


# B reaches 20 and H 20 so that both kernels run in both dtypes (lanes from
# B >= min(W, max(2, H)), W = 16 in float32 and 8 in float64); T includes 1 and non-powers of two
_shapes = dict(B=st.integers(1, 20), T=st.sampled_from([1, 2, 17, 60]), H=st.integers(1, 20),
               bias=st.booleans(), dtype=st.sampled_from(DTYPES),
               layout=st.sampled_from(["BTK", "TBK", "KTB", "slice"]), seed=st.integers(0, 999))


@settings(max_examples=25, deadline=None)
@given(diag=st.booleans(), **_shapes)
def test_gru_matches_the_cell_loop(B, T, H, diag, bias, dtype, layout, seed):
    _check_against_loop("gru", B, T, H, H, diag, bias, dtype, layout, seed)


@settings(max_examples=25, deadline=None)
@given(act=st.sampled_from(["tanh", "relu"]), diag=st.booleans(), **_shapes)
def test_elman_matches_the_cell_loop(act, B, T, H, diag, bias, dtype, layout, seed):
    _check_against_loop(act, B, T, H, H, diag, bias, dtype, layout, seed)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["dense", "diag", "proj"]), **_shapes)
def test_lstm_matches_the_cell_loop(kind, B, T, H, bias, dtype, layout, seed):
    if kind == "proj" and H == 1:
        kind = "dense"  # proj_size < hidden_size
    P = max(1, H // 2) if kind == "proj" else H
    _check_against_loop("lstm", B, T, H, P, kind == "diag", bias, dtype, layout, seed)


@pytest.mark.parametrize("B", [1, 5], ids=["rows", "lanes"])
@pytest.mark.parametrize("case", ["gru", "gru-diag", "tanh", "relu", "lstm", "lstm-diag",
                                  "lstm-proj"])
def test_gradcheck(case, B):
    cell, _, kind = case.partition("-")
    H = 3
    P = 2 if kind == "proj" else H
    gi, h0, c0, w, b, whr = _problem(cell, B, 4, H, P, kind == "diag", True, torch.float64, 0)
    assert compiled._plan(B, 4, H, P, GATES[cell] * H, torch.float64)[0] == \
        ("rows" if B == 1 else "lanes")
    if cell == "lstm":
        args = (gi, h0, c0, w, b) + ((whr,) if kind == "proj" else ())
        assert torch.autograd.gradcheck(compiled.lstm_sequence, args)
    elif cell == "gru":
        assert torch.autograd.gradcheck(compiled.gru_sequence, (gi, h0, w, b))
    else:
        assert torch.autograd.gradcheck(
            lambda *a: compiled.elman_sequence(*a, nonlinearity=cell), (gi, h0, w, b))


@pytest.mark.parametrize("kernel", ["lanes", "rows"])
def test_threads_split_the_batch_exactly(monkeypatch, kernel):
    """Split across two threads (each a range of the batch, its own weight gradients, summed),
    the results are those of one thread: the same bits but for the weight gradients, summed in
    another order. (``_plan`` splits only large lanes problems; forced here.)

    The weight gradients are sums over the N = B T steps of terms dgi (x) h_prev (dgi, the
    gradient of gi, is the gates' gradient); two orders of summing N float32 terms differ by
    at most 2 N u sum |terms| (u = 2^-24; Higham, Accuracy and Stability, sec. 4.2), the bound
    held here. (A bound relative to the largest gradient instead, as this test had, fails when
    terms cancel: on some draws of the data, with any numba version.)"""
    B, T, H = 133, 9, 3  # 9 groups of 16 (float32) rows: two pieces of 4+ groups
    gi, h0, c0, w, b, _ = _problem("lstm", B, T, H, H, False, True, torch.float32, 3)
    wt = torch.randn(B, T, H, generator=torch.Generator().manual_seed(4))
    results = []
    for nt in (1, 2):
        monkeypatch.setattr(compiled, "_plan", lambda *a, nt=nt: (kernel, nt))
        h, c = compiled.lstm_sequence(gi, h0, c0, w, b)
        grads = torch.autograd.grad((h * wt).sum() + c.sum(), (gi, h0, c0, w, b))
        results.append((h, c, *grads))
    for a, c in zip(results[0][:5], results[1][:5], strict=True):
        assert torch.equal(a, c)
    h, dgi = results[0][0].detach(), results[0][2]
    h_prev = torch.cat([h0.detach()[:, None], h[:, :-1]], 1)  # (B, T, H)
    abs_terms = {5: torch.einsum("btk,btp->kp", dgi.abs(), h_prev.abs()),  # dw: (4H, H)
                 6: dgi.abs().sum((0, 1))}  # db: (4H,)
    bound = 2 * B * T * 2.0 ** -24
    for i, s in abs_terms.items():
        assert ((results[0][i] - results[1][i]).abs() <= bound * s).all()


# The rows kernel advances its rows together: products in tiles of 4 rows by 4 vectors with
# tails of single rows and vectors (B = 1, 3, 5, 9 leave tails; H = 33 and 70 are not
# multiples of either SIMD width, and reach 4 vectors of units); W_hh's gradient is taken over
# blocks of 64 // B steps (T = 37 ends mid-block), W_hh h + b_hh kept by the forward from
# P = 32 on (``_SAVE_GATES_MIN_P``) or recomputed by the reverse sweep.
_ROWS_CASES = [("gru", 1, 37, 70), ("gru", 3, 37, 33), ("gru", 4, 1, 33), ("gru", 5, 37, 70),
               ("gru", 8, 20, 33), ("gru", 9, 37, 40), ("tanh", 5, 37, 70), ("relu", 9, 20, 33),
               ("lstm", 5, 37, 33), ("lstm", 1, 20, 70), ("lstm-proj", 5, 23, 70),
               ("gru-diag", 5, 37, 33), ("lstm-diag", 3, 20, 40)]


@pytest.mark.parametrize("save", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("case,B,T,H", _ROWS_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_kernel_tiles_match_the_loop(monkeypatch, case, B, T, H, save, dtype):
    cell, _, kind = case.partition("-")
    P = 35 if kind == "proj" else H
    monkeypatch.setattr(compiled, "_plan", lambda *a: ("rows", 1))
    monkeypatch.setattr(compiled, "_SAVE_GATES_MIN_P", 0 if save else 10 ** 9)
    _check_against_loop(cell, B, T, H, P, kind == "diag", True, dtype, "TBK", B * T + H)


@pytest.mark.parametrize("B,T,H", [(1, 1, 33), (1, 29, 70), (5, 29, 70), (7, 13, 128)])
def test_gru_sequence_matches_torch_gru_autograd_float64(B, T, H):
    """gru_sequence behind the input projection against torch.nn.GRU (torch's own kernel and
    autograd), float64: the outputs and the gradients of the input, h0 and all four weights."""
    g = torch.Generator().manual_seed(B * 1000 + T + H)
    ref = torch.nn.GRU(H, H, batch_first=True).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / H ** 0.5)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, B, H, generator=g, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    assert compiled._plan(B, T, H, H, 3 * H, torch.float64)[0] == "rows"
    gi = compiled.input_projection(x.transpose(0, 1), ref.weight_ih_l0, ref.bias_ih_l0, H)
    out = compiled.gru_sequence(gi, h0[0], ref.weight_hh_l0, ref.bias_hh_l0)
    want = ref(x, h0)[0]
    assert (out - want).abs().max().item() <= 1e-12
    leaves = [x, h0, *ref.parameters()]
    for a, c in zip(torch.autograd.grad((out * wt).sum(), leaves),
                    torch.autograd.grad((want * wt).sum(), leaves), strict=True):
        assert (a - c).abs().max().item() <= 1e-10 * (1 + c.abs().max().item())


def test_gates_are_kept_only_when_a_gradient_can_follow(monkeypatch):
    """The rows kernel keeps W_hh h + b_hh of every step (memory about gi's) for the reverse
    sweep: with grad mode on and a leaf that requires grad, not under no_grad (where
    parameters still require grad) nor without such a leaf."""
    kept = []
    forward = compiled._forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        kept.append(out[3] is not None)
        return out

    monkeypatch.setattr(compiled, "_forward", spy)
    H = 40
    gi, h0, w = torch.randn(2, 5, 3 * H), torch.zeros(2, H), torch.randn(3 * H, H)
    compiled.gru_sequence(gi, h0, w.requires_grad_(), None).sum().backward()
    with torch.no_grad():
        compiled.gru_sequence(gi, h0, w, None)
    compiled.gru_sequence(gi, h0, w.detach(), None)
    assert kept == [True, False, False]


def test_results_land_in_the_layout_the_kernel_writes():
    gi = torch.randn(16, 5, 3)  # lanes at H = 1: (H, T, B) memory
    out = compiled.gru_sequence(gi, torch.zeros(16, 1), torch.randn(3, 1), None)
    assert out.permute(2, 1, 0).is_contiguous()
    gi = torch.randn(1, 5, 24)  # rows: (T, B, H) memory
    out = compiled.gru_sequence(gi, torch.zeros(1, 8), torch.randn(24, 8), None)
    assert out.transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("B,H", [(16, 2), (16, 8), (1, 2), (21, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_input_projection_is_linear_in_the_kernels_layout(n, B, H, bias, batch_first):
    # batch_first: x a (T, B, n) view of (B, T, n) memory, as a batch_first layer passes it
    x = (torch.randn(B, 7, n, dtype=torch.float64).transpose(0, 1) if batch_first
         else torch.randn(7, B, n, dtype=torch.float64)).requires_grad_()
    W = torch.randn(3 * H, n, dtype=torch.float64, requires_grad=True)
    bi = torch.randn(3 * H, dtype=torch.float64, requires_grad=True) if bias else None
    gi = compiled.input_projection(x, W, bi, H)
    ref = F.linear(x, W, bi).transpose(0, 1)
    assert gi.shape == (B, 7, 3 * H) and torch.allclose(gi, ref, atol=1e-14)
    lanes_layout = H <= compiled._LANES_LAYOUT_MAX_H and B > 1
    assert gi.permute(2, 1, 0).is_contiguous() == lanes_layout
    leaves = [x, W] + ([bi] if bias else [])
    wt = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad((gi * wt).sum(), leaves),
                    torch.autograd.grad((ref * wt).sum(), leaves), strict=True):
        assert torch.allclose(a, c, atol=1e-12)


def test_empty_sequences_and_batches():
    for B, T in ((0, 4), (3, 0)):
        gi = torch.zeros(B, T, 8, requires_grad=True)
        h, c = compiled.lstm_sequence(gi, torch.zeros(B, 2), torch.zeros(B, 2), torch.ones(8, 2),
                                      None)
        assert h.shape == (B, T, 2) and c.shape == (B, T, 2)
        (h.sum() + c.sum()).backward()
        assert gi.grad.shape == gi.shape


def test_bad_arguments_raise_naming_them():
    gi = torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="h0 must have shape"):
        compiled.gru_sequence(gi, torch.zeros(2, 3), torch.zeros(6, 2), None)
    with pytest.raises(ValueError, match="weight_hh must have shape"):
        compiled.gru_sequence(gi, torch.zeros(2, 2), torch.zeros(6, 3), None)
    with pytest.raises(ValueError, match=r"gi.shape\[-1\] must be 4 H"):
        compiled.lstm_sequence(gi, torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(4, 1), None)
    with pytest.raises(ValueError, match="float32/float64"):
        compiled.gru_sequence(gi.half(), torch.zeros(2, 2), torch.zeros(6, 2), None)
    with pytest.raises(ValueError, match="nonlinearity"):
        compiled.elman_sequence(gi, torch.zeros(2, 6), torch.zeros(6, 6), None, "gelu")


def test_supported_only_on_cpu_float32_float64():
    assert compiled.supported(torch.zeros(1))
    assert compiled.supported(torch.zeros(1, dtype=torch.float64))
    assert not compiled.supported(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_and_sigmoid_match_torch_over_their_range(dtype):
    """With no recurrence the loops are their transcendentals: Elman's h = tanh(gi), an LSTM's
    c = sigmoid(gi_i) tanh(gi_g) (c0 = 0). float64 (vectorised expm1): within a few ulp,
    relative, tiny arguments included; float32 (the rational tanh): within 4e-7."""
    x = torch.cat([torch.linspace(-30, 30, 6001, dtype=dtype),
                   torch.logspace(-12, 0, 200, dtype=dtype),
                   -torch.logspace(-12, 0, 200, dtype=dtype), torch.tensor([0.0, 700.0, -745.0,
                                                                            1e4, -1e4],
                                                                           dtype=dtype)])
    N = x.numel()
    gi = x.view(N, 1, 1).expand(N, 3, 1).contiguous()  # lanes (B = N), 3 steps
    h = compiled.elman_sequence(gi, torch.zeros(N, 1, dtype=dtype), torch.zeros(1, 1,
                                dtype=dtype), None)
    ref = torch.tanh(x).view(N, 1).expand(N, 3)
    rel = ((h[..., 0] - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
    g4 = torch.stack([x, torch.zeros_like(x), torch.ones_like(x), torch.zeros_like(x)], -1)
    _, c = compiled.lstm_sequence(g4.view(N, 1, 4), torch.zeros(N, 1, dtype=dtype),
                                  torch.zeros(N, 1, dtype=dtype), torch.zeros(4, 1, dtype=dtype),
                                  None)
    cref = torch.sigmoid(x) * torch.tanh(torch.ones((), dtype=dtype))
    if dtype == torch.float64:
        assert rel < 1e-15
        inside = x >= -700  # below, sigmoid < 1e-304: the loop clamps its argument there
        crel = ((c[:, 0, 0] - cref).abs() / cref)[inside].max().item()
        assert crel < 1e-15 and (c[:, 0, 0] - cref)[~inside].abs().max().item() < 1e-300
    else:
        assert (h[..., 0] - ref).abs().max().item() < 4e-7
        assert (c[:, 0, 0] - cref).abs().max().item() < 6e-7


def test_fast_tanh_is_within_4e7_of_tanh_in_float32():
    import numpy as np

    xs = np.linspace(-12.0, 12.0, 24001).astype(np.float32)
    got = np.array([compiled._fast_tanh(np.float32(x)) for x in xs], dtype=np.float32)
    assert got.dtype == np.float32
    assert np.abs(got.astype(np.float64) - np.tanh(xs.astype(np.float64))).max() < 4e-7
    assert compiled._fast_tanh(np.float32(0.0)) == 0.0


@pytest.mark.parametrize("cell", sorted(GATES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [2, 20])  # rows and lanes
def test_nan_propagates_like_the_loop(cell, dtype, B):
    """A nan in gi makes that row's state nan from that step on, as torch's cells do. (The
    kernels' clip inside tanh/sigmoid and relu's max once turned a nan into a finite value:
    a plausible-looking wrong trajectory.) The other rows stay finite."""
    K, H = GATES[cell] * 3, 3
    g = torch.Generator().manual_seed(7)
    gi = torch.randn(B, 10, K, generator=g, dtype=dtype)
    gi[1, 4, 0] = float("nan")
    h0 = torch.zeros(B, H, dtype=dtype)
    w = 0.3 * torch.randn(K, H, generator=g, dtype=dtype)
    b = torch.zeros(K, dtype=dtype)
    out = _compiled(cell, gi, h0, h0, w, b, None)
    ref = _loop(cell, gi, h0, h0, w, b, None)
    out, ref = (out[0], ref[0]) if cell == "lstm" else (out, ref)
    assert torch.equal(out.isnan(), ref.isnan())
    assert bool(out[1, 4:].isnan().any(-1).all()) and not bool(out[0].isnan().any())


@pytest.mark.parametrize("mode", ["GRU", "LSTM", "RNN"])
def test_weight_gradients_have_resizable_storage(mode):
    """FSDP frees a parameter's storage by resizing it: neither the parameters nor the compiled
    path's weight gradients may share memory with NumPy (taking .numpy() of a tensor, or
    torch.from_numpy, makes its storage non-resizable)."""
    import paraseq.nn as pnn

    m = getattr(pnn, mode)(3, 40 if mode == "GRU" else 8, method="auto")  # rows / lanes
    m(torch.randn(50, 8, 3))[0].sum().backward()
    assert "compiled" in m.last_path
    for p in m.parameters():  # a same-size resize raises for NumPy-shared storage
        for t in (p, p.grad):
            t.untyped_storage().resize_(t.untyped_storage().nbytes())
