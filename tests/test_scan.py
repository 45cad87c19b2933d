"""paraseq.linear_scan against independent float64 references, on every backend.

Shape letters: T time steps, D state size, B batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import scan_autograd, scan_numpy
from torch.autograd import gradcheck, gradgradcheck

import paraseq
from paraseq.scan import BACKENDS, compiled, gpu
from paraseq.scan.api import choose_backend
from paraseq.scan.chunked import chunked_scan
from paraseq.scan.parallel import hillis_steele_scan

# "numba" if installed; "triton" only on a GPU (tests/test_triton.py runs it through triton's
# interpreter on a CPU, on sizes the interpreter can afford)
AVAILABLE = [name for name, b in BACKENDS.items() if b.is_available()
             and (name != "triton" or torch.cuda.is_available())]
NAMES = [*AVAILABLE, "auto"]
CPU_ONLY = {"numba"}
LENGTHS = [1, 2, 3, 17, 489, 1047]
BATCHES = [(), (3,), (2, 3)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make(batch_a, batch_b, batch_x0, T, D, *, dense, dtype, x0=True, seed=0):
    """Coefficients with |a| <= 1 (spectral norm <= 1 when dense), inputs of unit scale."""
    g = torch.Generator().manual_seed(seed)
    cplx = dtype.is_complex
    real = torch.float64

    def rnd(*shape):
        r = torch.rand(*shape, generator=g, dtype=real) * 2 - 1
        if cplx:
            r = torch.complex(r, torch.rand(*shape, generator=g, dtype=real) * 2 - 1)
        return r

    if dense:
        a = rnd(*batch_a, T, D, D)
        a = a / torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)[..., None, None]
    else:
        a = rnd(*batch_a, T, D)
        a = a / a.abs().clamp_min(1.0)
    b = rnd(*batch_b, T, D)
    x = rnd(*batch_x0, D) if x0 else None
    return a.to(dtype), b.to(dtype), None if x is None else x.to(dtype)


def rel_err(x: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(ref)
    scale = max(1.0, ref_t.abs().max().item()) if ref_t.numel() else 1.0
    return (x.to(ref_t.dtype) - ref_t).abs().max().item() / scale if ref_t.numel() else 0.0


def np_of(t):
    return None if t is None else t.detach().to(torch.complex128 if t.is_complex()
                                                else torch.float64).numpy()


# ----------------------------------------------------------------------------- forward values

def _broadcasts(s1, s2) -> bool:
    try:
        torch.broadcast_shapes(s1, s2)
    except RuntimeError:
        return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.one_of(st.sampled_from(LENGTHS), st.integers(1, 300)),
    D=st.integers(1, 4),
    batch=st.sampled_from(BATCHES),
    share=st.sampled_from(["none", "a", "b", "x0"]),
    dense=st.booleans(),
    reverse=st.booleans(),
    with_x0=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.complex128, torch.complex64]),
    backend=st.sampled_from(NAMES),
    explicit=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(T, D, batch, share, dense, reverse, with_x0, dtype, backend,
                           explicit, seed):
    # one of the three may be shared across the batch (broadcast), as for shared coefficients
    ba, bb, bx = (() if share == k else batch for k in ("a", "b", "x0"))
    a, b, x0 = make(ba, bb, bx, T, D, dense=dense, dtype=dtype, x0=with_x0, seed=seed)
    structure = ("dense" if dense else "diagonal") if explicit else "auto"
    # both readings fit: dense (..., T, D, D) and diagonal with a batch dim that broadcasts
    ambiguous = (T == D and a.shape[-3:] == (T, D, D)
                 and _broadcasts(a.shape[:-3], b.shape[:-2])
                 and _broadcasts(a.shape[:-2], b.shape[:-2]))
    if ambiguous and not explicit:
        with pytest.raises(ValueError, match="pass structure='diagonal' or structure='dense'"):
            paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend)
        return
    x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend, structure=structure)
    ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=dense, reverse=reverse)
    assert x.shape == ref.shape and x.dtype == dtype
    tol = 1e-10 if dtype in (torch.float64, torch.complex128) else 1e-5
    assert rel_err(x, ref) <= tol


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("T", LENGTHS)
def test_lengths_and_batches(backend, dense, T):
    for i, batch in enumerate(BATCHES):
        for dtype in (torch.float64, torch.float32):
            a, b, x0 = make(batch, batch, (), T, 3, dense=dense, dtype=dtype, seed=i)
            for reverse in (False, True):
                x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend,
                                        structure="dense" if dense else "diagonal")
                ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=dense, reverse=reverse)
                assert rel_err(x, ref) <= (1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_long_sequence_float32(backend):
    # T = 1e5, B*D = 64: the chunked and parallel trees over many levels, in float32
    a, b, x0 = make((4,), (4,), (4,), 100_000 if backend != "sequential" else 5_000, 16,
                    dense=False, dtype=torch.float32, seed=3)
    x = paraseq.linear_scan(a, b, x0, backend=backend)
    ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=False)
    assert rel_err(x, ref) <= 1e-5


@pytest.mark.parametrize("chunk", [2, 3, 8, 31, 500])
@pytest.mark.parametrize("dense", [False, True])
def test_chunk_sizes(chunk, dense):
    # remainders, one chunk only, chunks longer than half the sequence
    for T in (17, 489, 1047):
        a, b, x0 = make((2,), (2,), (), T, 2, dense=dense, dtype=torch.float64, seed=T)
        for reverse in (False, True):
            x = chunked_scan(a, b, x0, dense=dense, reverse=reverse, chunk=chunk)
            ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=dense, reverse=reverse)
            assert rel_err(x, ref) <= 1e-10


@pytest.mark.parametrize("dense", [False, True])
def test_hillis_steele_alternative(dense):
    # the algorithm benchmarks/scan.py compares "parallel" with
    for T in (1, 2, 17, 489):
        a, b, x0 = make((3,), (), (3,), T, 2, dense=dense, dtype=torch.float64, seed=T)
        for reverse in (False, True):
            x = hillis_steele_scan(a, b, x0, dense=dense, reverse=reverse)
            ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=dense, reverse=reverse)
            assert rel_err(x, ref) <= 1e-10


@pytest.mark.parametrize("backend", NAMES)
def test_low_precision_accumulates_in_float32(backend):
    a, b, x0 = make((2,), (2,), (2,), 489, 8, dense=False, dtype=torch.float32, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        a_l, b_l, x_l = a.to(dtype), b.to(dtype), x0.to(dtype)
        x = paraseq.linear_scan(a_l, b_l, x_l, backend=backend)
        assert x.dtype == dtype
        # exact on the rounded inputs up to the final rounding to the low dtype
        ref = scan_numpy(np_of(a_l), np_of(b_l), np_of(x_l), dense=False)
        eps = torch.finfo(dtype).eps
        assert rel_err(x.float(), ref) <= 2 * eps


def test_empty_sequence():
    for dense in (False, True):
        a = torch.zeros(2, 0, 3, 3) if dense else torch.zeros(2, 0, 3)
        x = paraseq.linear_scan(a, torch.zeros(2, 0, 3), torch.zeros(3))
        assert x.shape == (2, 0, 3)


def test_result_is_a_fresh_tensor():
    # T == 1 with the batch carried by a only: the result must still be writable memory
    a, b = torch.rand(4, 1, 2), torch.randn(1, 2)
    for backend in NAMES:
        x = paraseq.linear_scan(a, b, backend=backend)
        assert x.shape == (4, 1, 2)
        x.add_(1.0)


def test_structure_disambiguation():
    # T == D == 4 with a of b's rank: either reading fits, so it must be said
    a = torch.rand(4, 4, 4, dtype=torch.float64) * 0.5
    b = torch.randn(4, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"reads both as diagonal .* pass structure="):
        paraseq.linear_scan(a, b)
    diag = paraseq.linear_scan(a, b, structure="diagonal")
    assert rel_err(diag, scan_numpy(a.numpy(), b.numpy(), dense=False)) <= 1e-12
    dense = paraseq.linear_scan(a, b, structure="dense")
    assert rel_err(dense, scan_numpy(a.numpy(), b.numpy(), dense=True)) <= 1e-12
    # more dims than b, but the diagonal reading broadcasts too (a batch (4, 4) of (T, D)
    # coefficients against b's batch (4,)): still ambiguous, so it raises
    a5 = torch.rand(4, 4, 4, 4, dtype=torch.float64) * 0.3
    with pytest.raises(ValueError, match=r"reads both as diagonal .* pass structure="):
        paraseq.linear_scan(a5, b)
    # a batch of diagonal coefficients against a shared b (T == D == batch): ambiguous too
    # (it once read as dense and returned a (T, D) result for a (3, T, D) problem)
    a3 = torch.rand(3, 3, 3, dtype=torch.float64) * 0.5
    b3 = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"reads both as diagonal .* pass structure="):
        paraseq.linear_scan(a3, b3)
    x = paraseq.linear_scan(a3, b3, structure="diagonal")
    assert x.shape == (3, 3, 3)
    assert rel_err(x, scan_numpy(a3.numpy(), b3.numpy(), dense=False)) <= 1e-12
    # shared dense (T, D, D) against a batched b, T == D == 2: the diagonal reading (a batch
    # (2,) against b's (3,)) does not broadcast, so it is dense (it once went diagonal and
    # failed on the broadcast)
    a2 = torch.rand(2, 2, 2, dtype=torch.float64) * 0.5
    b2 = torch.randn(3, 2, 2, dtype=torch.float64)
    x = paraseq.linear_scan(a2, b2)
    assert rel_err(x, scan_numpy(a2.numpy(), b2.numpy(), dense=True)) <= 1e-12
    # only one reading broadcasts: no question (b's batch 2 against a's trailing 4 as diagonal)
    a6 = torch.rand(2, 4, 4, 4, dtype=torch.float64) * 0.3
    b6 = torch.randn(2, 4, 4, dtype=torch.float64)
    x = paraseq.linear_scan(a6, b6)
    assert rel_err(x, scan_numpy(a6.numpy(), b6.numpy(), dense=True)) <= 1e-12


def test_auto_rule(monkeypatch):
    # the pure-torch rule (tests/test_kernels.py checks the rule with numba, and
    # tests/test_triton.py with triton)
    monkeypatch.setattr(compiled, "AVAILABLE", False)
    monkeypatch.setattr(gpu, "AVAILABLE", False)
    cpu = torch.device("cpu")
    assert choose_backend(16, 64, 64, False, torch.float32, cpu) == "sequential"
    assert choose_backend(1000, 64, 16, False, torch.float32, cpu) == "chunked"
    assert choose_backend(1000, 1, 1, False, torch.float32, cpu) == "parallel"
    assert choose_backend(1000, 64, 16, True, torch.float32, cpu) == "parallel"
    assert choose_backend(1000, 64, 16, False, torch.float32, torch.device("cuda")) == "parallel"


# ----------------------------------------------------------------------------- NaN and inf

@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("dense", [False, True])
def test_nonfinite_propagate_like_the_loop(backend, dense):
    T, D = 489, 3
    a, b, x0 = make((2,), (2,), (), T, D, dense=dense, dtype=torch.float64, seed=7)
    b[0, 100, 1] = float("nan")
    b[1, 300, 0] = float("inf")
    if not dense:
        a[1, 200, 2] = 0.0  # a zero coefficient does not stop a nan (0 * nan = nan)
        b[1, 150, 2] = float("nan")
    for reverse in (False, True):
        x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend)
        ref = torch.from_numpy(scan_numpy(a.numpy(), b.numpy(), x0.numpy(), dense=dense,
                                          reverse=reverse))
        assert torch.equal(torch.isfinite(x), torch.isfinite(ref))
        if not dense:  # dense products of an inf state may give nan or inf by operation order
            assert torch.equal(torch.isnan(x), torch.isnan(ref))
            assert torch.equal(torch.isinf(x), torch.isinf(ref))
        finite = torch.isfinite(ref)
        assert torch.allclose(x[finite], ref[finite], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- gradients

GRAD_CASES = [
    (dense, reverse, dtype, with_x0)
    for dense in (False, True)
    for reverse in (False, True)
    for dtype in (torch.float64, torch.complex128)
    for with_x0 in (True, False)
]


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize(("dense", "reverse", "dtype", "with_x0"), GRAD_CASES)
def test_gradcheck(backend, dense, reverse, dtype, with_x0):
    # broadcast coefficients (a shared across the batch) exercise the sum back to a's shape;
    # T = 19 > 16 so "auto" takes a parallel path; chunked gets several chunks and a remainder
    a, b, x0 = make((), (2,), (2,), 19, 2, dense=dense, dtype=dtype, x0=with_x0, seed=11)
    inputs = [a.requires_grad_(), b.requires_grad_()]
    if with_x0:
        inputs.append(x0.requires_grad_())

    def f(a, b, x0=None):
        return paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend)

    assert gradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["parallel", "chunked"])
@pytest.mark.parametrize("dense", [False, True])
def test_double_backward(backend, dense):
    a, b, x0 = make((), (2,), (2,), 19, 2, dense=dense, dtype=torch.float64, seed=5)
    inputs = (a.requires_grad_(), b.requires_grad_(), x0.requires_grad_())
    assert gradgradcheck(lambda a, b, x0: paraseq.linear_scan(a, b, x0, backend=backend), inputs)


@pytest.mark.parametrize("backend", NAMES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_grad_equals_autograd_through_the_loop(backend, dense, reverse):
    a, b, x0 = make((3,), (3,), (), 489, 3, dense=dense, dtype=torch.float64, seed=2)
    w = torch.randn(3, 489, 3, dtype=torch.float64)  # a random cotangent
    grads = []
    for fn in (lambda a, b, x0: paraseq.linear_scan(a, b, x0, reverse=reverse, backend=backend),
               lambda a, b, x0: scan_autograd(a, b, x0, dense=dense, reverse=reverse)):
        leaves = [t.clone().requires_grad_() for t in (a, b, x0)]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["parallel", "chunked", "sequential"])
def test_forward_mode(backend):
    a, b, x0 = make((2,), (2,), (2,), 37, 3, dense=False, dtype=torch.float64, seed=4)
    tangents = tuple(torch.randn_like(t) for t in (a, b, x0))
    _, got = torch.func.jvp(lambda a, b, x0: paraseq.linear_scan(a, b, x0, backend=backend),
                            (a, b, x0), tangents)
    _, want = torch.func.jvp(lambda a, b, x0: scan_autograd(a, b, x0, dense=False),
                             (a, b, x0), tangents)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_backward_memory_is_linear_in_T():
    # the forward keeps no tree levels alive: what autograd saves is a, x0 and the output
    a, b, x0 = make((), (4,), (4,), 4096, 8, dense=False, dtype=torch.float64, seed=0)
    a.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        paraseq.linear_scan(a, b, x0, backend="parallel")
    assert sum(saved) <= a.numel() + x0.numel() + 4 * 4096 * 8


# ----------------------------------------------------------------------------- bad input

def test_bad_input_messages():
    a, b, x0 = torch.rand(5, 3), torch.randn(5, 3), torch.randn(3)
    with pytest.raises(TypeError, match=r"a must be a torch.Tensor; got list"):
        paraseq.linear_scan([[1.0]], b)
    with pytest.raises(TypeError, match=r"b must be a torch.Tensor; got ndarray"):
        paraseq.linear_scan(a, np.zeros((5, 3)))
    with pytest.raises(TypeError, match=r"x0 must be a torch.Tensor .* got float"):
        paraseq.linear_scan(a, b, 1.0)
    with pytest.raises(ValueError, match=r"a must be .* \(\.\.\., 5, 3\) .* got a of shape "
                                         r"\(4, 3\)"):
        paraseq.linear_scan(torch.rand(4, 3), b)  # mismatched T
    with pytest.raises(ValueError, match=r"got a of shape \(5, 2\)"):
        paraseq.linear_scan(torch.rand(5, 2), b)  # mismatched D
    with pytest.raises(ValueError, match=r"got a of shape \(5,\)"):
        paraseq.linear_scan(torch.rand(5), b)  # wrong rank
    with pytest.raises(ValueError, match=r"got a of shape \(5, 3, 2\)"):
        paraseq.linear_scan(torch.rand(5, 3, 2), b)  # dense of the wrong size
    with pytest.raises(ValueError, match=r"b must have shape \(\.\.\., T, D\) .* got shape \(5,\)"):
        paraseq.linear_scan(torch.rand(5), torch.rand(5))
    with pytest.raises(ValueError, match=r"x0 must have shape \(\.\.\., D\) = \(\.\.\., 3\)"):
        paraseq.linear_scan(a, b, torch.randn(4))
    with pytest.raises(TypeError, match=r"a has dtype torch.float64 but b has torch.float32"):
        paraseq.linear_scan(a.double(), b)
    with pytest.raises(TypeError, match=r"x0 has dtype torch.complex64 but b has torch.float32"):
        paraseq.linear_scan(a, b, x0.to(torch.complex64))
    with pytest.raises(TypeError, match=r"b has dtype torch.int64; expected a floating"):
        paraseq.linear_scan(a.long(), b.long())
    with pytest.raises(ValueError, match=r"a is on meta but b is on cpu"):
        paraseq.linear_scan(a.to("meta"), b)
    with pytest.raises(ValueError, match=r"x0 is on meta but b is on cpu"):
        paraseq.linear_scan(a, b, x0.to("meta"))
    with pytest.raises(ValueError, match=r"batch\) dims .* must broadcast .* a \(2, 5, 3\), "
                                         r"b \(3, 5, 3\)"):
        paraseq.linear_scan(torch.rand(2, 5, 3), torch.rand(3, 5, 3))
    with pytest.raises(ValueError, match=r"unknown backend 'fast'; valid: 'auto', 'sequential'"):
        paraseq.linear_scan(a, b, backend="fast")
    with pytest.raises(ValueError, match=r"structure must be 'auto', 'diagonal' or 'dense'"):
        paraseq.linear_scan(a, b, structure="banded")
    with pytest.raises(ValueError, match=r"structure='dense' needs a of shape"):
        paraseq.linear_scan(a, b, structure="dense")
    with pytest.raises(TypeError, match=r"reverse must be a bool"):
        paraseq.linear_scan(a, b, reverse="yes")


# ----------------------------------------------------------------------------- devices

@CUDA
@pytest.mark.parametrize("backend", [n for n in NAMES if n not in CPU_ONLY])
def test_cuda_matches_cpu(backend):
    a, b, x0 = make((2,), (2,), (2,), 1047, 8, dense=False, dtype=torch.float32, seed=0)
    x = paraseq.linear_scan(a.cuda(), b.cuda(), x0.cuda(), backend=backend)
    assert x.device.type == "cuda"
    ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=False)
    assert rel_err(x.cpu(), ref) <= 1e-5


def test_version():
    assert isinstance(paraseq.__version__, str) and paraseq.__version__.count(".") >= 2
    assert math.isfinite(float(paraseq.__version__.split(".")[0]))
