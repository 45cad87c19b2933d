"""The compiled CPU kernels (backend "numba", paraseq.scan.compiled) against the float64
sequential reference of tests/reference.py: values, every work split, broadcasting, gradients,
the backend="auto" rule, and what happens without numba.

Shape letters: T time steps, D state size, B batch.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import scan_autograd, scan_numpy
from torch.autograd import gradcheck, gradgradcheck

import paraseq
from paraseq.scan import compiled
from paraseq.scan.api import choose_backend

DTYPES = [torch.float64, torch.float32, torch.complex128, torch.complex64]
LENGTHS = [0, 1, 2, 3, 17, 489, 1047]
# batch shapes of (a, b, x0) that broadcast; () is one shared across the batch
BROADCASTS = [((), (), ()), ((3,), (3,), (3,)), ((), (2, 3), (3,)), ((2, 1), (1, 3), ()),
              ((5,), (), (5,)), ((2, 3), (3,), (2, 1))]


@pytest.fixture
def numba():
    return pytest.importorskip("numba")


@pytest.fixture
def threaded(monkeypatch):
    """Run even small problems through the thread pool, on two threads."""
    monkeypatch.setattr(compiled, "SERIAL_ELEMENTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def make(batch_a, batch_b, batch_x0, T, D, *, dense, dtype, x0=True, seed=0):
    """Coefficients with |a| <= 1 (spectral norm <= 1 when dense), inputs of unit scale."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        r = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
        if dtype.is_complex:
            r = torch.complex(r, torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1)
        return r

    if dense:
        a = rnd(*batch_a, T, D, D)  # (..., T, D, D)
        a = a / torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)[..., None, None]
    else:
        a = rnd(*batch_a, T, D)  # (..., T, D)
        a = a / a.abs().clamp_min(1.0)
    b = rnd(*batch_b, T, D)  # (..., T, D)
    x = rnd(*batch_x0, D) if x0 else None  # (..., D)
    return a.to(dtype), b.to(dtype), None if x is None else x.to(dtype)


def np_of(t):
    return None if t is None else t.detach().to(torch.complex128 if t.is_complex()
                                                else torch.float64).resolve_conj().numpy()


def assert_matches(x, a, b, x0, *, dense, reverse, dtype):
    ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=dense, reverse=reverse)
    assert x.shape == ref.shape and x.dtype == dtype
    if ref.size == 0:
        return
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(x.detach().to(torch.complex128).numpy() - ref).max()) / scale
    assert err <= (1e-10 if dtype in (torch.float64, torch.complex128) else 2e-5), err


def structure(dense):
    return "dense" if dense else "diagonal"


# ----------------------------------------------------------------------------- forward values

@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    T=st.one_of(st.sampled_from(LENGTHS), st.integers(0, 300)),
    D=st.one_of(st.integers(1, 5), st.sampled_from([15, 16, 17, 33])),
    shapes=st.sampled_from(BROADCASTS),
    dense=st.booleans(),
    reverse=st.booleans(),
    with_x0=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    pool=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(numba, T, D, shapes, dense, reverse, with_x0, dtype, pool, seed):
    if dense and D > 16:
        D = 4
    a, b, x0 = make(*shapes, T, D, dense=dense, dtype=dtype, x0=with_x0, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        if pool:  # through the thread pool and the time-chunked plans, even when small
            mp.setattr(compiled, "SERIAL_ELEMENTS", 0)
            mp.setattr(compiled, "TIME_SPLIT_MIN", 0)
            mp.setattr(compiled, "MIN_CHUNK", 4)
        x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend="numba",
                                structure=structure(dense))
    assert_matches(x, a, b, x0, dense=dense, reverse=reverse, dtype=dtype)


PLANS = [("narrow", 1, 1), ("narrow", 1, 512), ("narrow", 2, 3), ("narrow", 5, 7),
         ("narrow", 16, 512), ("narrow", 50, 2),
         ("wide", 16, 1), ("wide", 32, 1), ("wide", 16, 2), ("wide", 48, 3), ("wide", 16, 7),
         ("series", 1, 0), ("series", 2, 0), ("series", 3, 0), ("series", 9, 0)]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_every_plan(numba, threaded, plan, dtype):
    # chunk counts that do not divide T, more chunks than threads, chunks shorter than a block,
    # lockstep groups with fewer than four chains, units narrower than a row
    for T, D in ((1, 3), (17, 1), (489, 2), (1047, 3), (211, 40)):
        if (plan[0] == "wide" and D < 16) or (plan[0] == "series"
                                              and (D != 1 or dtype.is_complex)):
            continue
        for shapes in (((), (), ()), ((3,), (3,), ()), ((), (2, 3), (3,))):
            a, b, x0 = make(*shapes, T, D, dense=False, dtype=dtype, seed=T)
            for reverse in (False, True):
                for x0_ in (x0, None):
                    x = compiled.numba_scan(a, b, x0_, dense=False, reverse=reverse, plan=plan)
                    assert_matches(x, a, b, x0_, dense=False, reverse=reverse, dtype=dtype)


@pytest.mark.parametrize(("B", "T", "D"), [(1, 100_000, 1), (1, 40_000, 64), (4, 30_000, 16),
                                           (64, 2_000, 1), (3, 5_000, 3)])
def test_long_sequences_float32(numba, threaded, B, T, D):
    # the plans auto picks on two threads, over many chunks, held to float64
    a, b, x0 = make((B,), (B,), (B,), T, D, dense=False, dtype=torch.float32, seed=3)
    for reverse in (False, True):
        x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend="numba")
        assert_matches(x, a, b, x0, dense=False, reverse=reverse, dtype=torch.float32)


@pytest.mark.parametrize("D", [1, 8, 33, 64])
def test_dense_sizes(numba, threaded, D):
    a, b, x0 = make((3,), (3,), (), 257, D, dense=True, dtype=torch.float64, seed=D)
    for reverse in (False, True):
        x = paraseq.linear_scan(a, b, x0, reverse=reverse, backend="numba", structure="dense")
        assert_matches(x, a, b, x0, dense=True, reverse=reverse, dtype=torch.float64)


def test_strided_and_expanded_inputs(numba):
    # expanded (stride-0) batch dims are read in place; other layouts are copied first
    T, D = 301, 5
    a0, b, x0 = make((), (4,), (4,), T, D, dense=False, dtype=torch.float64, seed=1)
    a = a0.expand(4, T, D)  # (4, T, D), stride 0 in the batch dim
    bt = b.transpose(-1, -2).contiguous().transpose(-1, -2)  # (4, T, D), D not the inner dim
    xt = x0.T.contiguous().T  # (4, D), column-major
    x = paraseq.linear_scan(a, bt, xt, backend="numba")
    assert_matches(x, a, b, x0, dense=False, reverse=False, dtype=torch.float64)
    c = make((), (), (), T, D, dense=False, dtype=torch.complex128, seed=2)
    x = paraseq.linear_scan(c[0].conj(), c[1], -c[2], backend="numba")  # lazy conj / neg bits
    assert_matches(x, c[0].conj(), c[1], -c[2], dense=False, reverse=False,
                   dtype=torch.complex128)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32])
@pytest.mark.parametrize("batch", [(3,), (2, 3), ()])
def test_transposed_dense_coefficients(numba, dtype, batch):
    # A_t given as the transposed view of contiguous A_t^T (a Jacobian stored column by
    # column) is read in place by the transposed kernel; broadcast and expanded batch dims too
    T, D = 203, 6
    a, b, x0 = make(batch, (2, 3), (3,), T, D, dense=True, dtype=dtype, seed=7)
    at = a.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, A^T's storage
    assert compiled._transposed(at) and not compiled._transposed(a)
    for reverse in (False, True):
        x = paraseq.linear_scan(at, b, x0, reverse=reverse, backend="numba", structure="dense")
        assert_matches(x, a, b, x0, dense=True, reverse=reverse, dtype=dtype)
    shared = at[..., :1, :, :, :].expand(*batch, T, D, D) if batch else at  # stride 0
    x = paraseq.linear_scan(shared, b, x0, backend="numba", structure="dense")
    assert_matches(x, shared.contiguous(), b, x0, dense=True, reverse=False, dtype=dtype)
    g = torch.randn(T, D, D, dtype=torch.float64)[::2]  # strided in time: copied, still right
    assert not compiled._transposed(g.transpose(-1, -2))
    x = paraseq.linear_scan(g.transpose(-1, -2).to(dtype) * 0.3, b[..., ::2, :], None,
                            backend="numba", structure="dense")
    ref = paraseq.linear_scan(g.transpose(-1, -2).contiguous().to(dtype) * 0.3, b[..., ::2, :],
                              None, backend="sequential", structure="dense")
    torch.testing.assert_close(x, ref)


def test_low_precision_is_computed_in_float32(numba):
    a, b, x0 = make((2,), (2,), (2,), 489, 8, dense=False, dtype=torch.float32, seed=1)
    for dtype in (torch.bfloat16, torch.float16):
        low = [t.to(dtype) for t in (a, b, x0)]
        x = paraseq.linear_scan(*low, backend="numba")
        assert x.dtype == dtype
        # exact on the rounded inputs up to the final rounding to the low dtype
        ref = scan_numpy(*(np_of(t) for t in low), dense=False)
        err = np.abs(x.double().numpy() - ref).max() / max(1.0, np.abs(ref).max())
        assert err <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("plan", [None, ("narrow", 8, 5), ("wide", 16, 3), ("series", 1, 0),
                                  ("series", 3, 0)])
def test_nonfinite_propagate_like_the_loop(numba, threaded, plan):
    kind = plan[0] if plan else "narrow"
    T, D = 489, 16 if kind == "wide" else 3
    a, b, x0 = make((2,), (2,), (), T, D, dense=False, dtype=torch.float64, seed=7)
    b[0, 100, 1] = float("nan")
    b[1, 300, 0] = float("inf")
    a[1, 200, 2] = 0.0  # a zero coefficient does not stop a nan (0 * nan = nan)
    b[1, 150, 2] = float("nan")
    b[0, 40, 0] = float("-inf")
    if kind == "series":  # one channel: each of the 2 x 3 (batch, channel) series on its own
        a, b = (t.transpose(-1, -2).reshape(6, T, 1) for t in (a, b))
        x0 = x0.reshape(3, 1).repeat(2, 1).reshape(6, 1)
    for reverse in (False, True):
        x = compiled.numba_scan(a, b, x0, dense=False, reverse=reverse, plan=plan)
        ref = torch.from_numpy(scan_numpy(a.numpy(), b.numpy(), x0.numpy(), dense=False,
                                          reverse=reverse))
        assert torch.equal(torch.isnan(x), torch.isnan(ref))
        assert torch.equal(torch.isinf(x), torch.isinf(ref))
        assert torch.equal(x[torch.isinf(x)], ref[torch.isinf(ref)])  # the signs too
        finite = torch.isfinite(ref)
        assert torch.allclose(x[finite], ref[finite], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("with_x0", [True, False])
def test_gradcheck(numba, dense, reverse, dtype, with_x0):
    # a shared across the batch: the adjoint sums its gradient back to a's shape
    a, b, x0 = make((), (2,), (2,), 19, 2, dense=dense, dtype=dtype, x0=with_x0, seed=11)
    inputs = [a.requires_grad_(), b.requires_grad_()]
    if with_x0:
        inputs.append(x0.requires_grad_())

    def f(a, b, x0=None):
        return paraseq.linear_scan(a, b, x0, reverse=reverse, backend="numba",
                                   structure=structure(dense))

    assert gradcheck(f, inputs)


@pytest.mark.parametrize("dense", [False, True])
def test_double_backward_and_forward_mode(numba, dense):
    a, b, x0 = make((), (2,), (2,), 19, 2, dense=dense, dtype=torch.float64, seed=5)
    inputs = (a.requires_grad_(), b.requires_grad_(), x0.requires_grad_())
    assert gradgradcheck(lambda a, b, x0: paraseq.linear_scan(a, b, x0, backend="numba"),
                         inputs)
    primals = tuple(t.detach() for t in inputs)
    tangents = tuple(torch.randn_like(t) for t in primals)
    _, got = torch.func.jvp(lambda a, b, x0: paraseq.linear_scan(a, b, x0, backend="numba"),
                            primals, tangents)
    _, want = torch.func.jvp(lambda a, b, x0: scan_autograd(a, b, x0, dense=dense), primals,
                             tangents)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_grad_equals_autograd_through_the_loop(numba, threaded, dense, reverse):
    a, b, x0 = make((3,), (3,), (), 1047, 3, dense=dense, dtype=torch.float64, seed=2)
    w = torch.randn(3, 1047, 3, dtype=torch.float64)  # a random cotangent
    grads = []
    for fn in (lambda a, b, x0: paraseq.linear_scan(a, b, x0, reverse=reverse, backend="numba"),
               lambda a, b, x0: scan_autograd(a, b, x0, dense=dense, reverse=reverse)):
        leaves = [t.clone().requires_grad_() for t in (a, b, x0)]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- auto and errors

def test_auto_picks_numba_on_cpu(numba):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for dtype in (torch.float32, torch.float64, torch.complex64, torch.bfloat16):
        assert choose_backend(1000, 64, 16, False, dtype, cpu) == "numba"
        assert choose_backend(3, 1, 1, False, dtype, cpu) == "numba"
        assert choose_backend(2, 64, 16, True, dtype, cpu) == "numba"
    assert choose_backend(2, 64, 16, False, torch.float32, cpu) == "sequential"
    # off the CPU numba does not apply: a dense a too wide for the Triton kernels (D > 64)
    # takes the pure-torch tree (D <= 64 on CUDA: tests/test_dense_triton.py)
    assert choose_backend(1000, 65, 16, True, torch.float32, cuda) == "parallel"


def test_without_numba(monkeypatch):
    # numba missing: asking for it by name is an error that says what to install; auto and
    # the other backends keep working
    monkeypatch.setattr(compiled, "AVAILABLE", False)
    monkeypatch.setattr(compiled, "_module", None)
    a, b = torch.rand(40, 3), torch.randn(40, 3)
    with pytest.raises(ValueError, match=r"backend='numba' cannot run: it needs the numba "
                                         r"package.*pip install 'numba>=0\.59'.*backend='auto'"):
        paraseq.linear_scan(a, b, backend="numba")
    with pytest.raises(ValueError, match=r"needs the numba package"):
        compiled.numba_scan(a, b, None, dense=False)
    assert choose_backend(40, 3, 1, False, torch.float32, torch.device("cpu")) == "parallel"
    x = paraseq.linear_scan(a, b)
    assert torch.allclose(x, paraseq.linear_scan(a, b, backend="sequential"), atol=1e-6)


def test_numba_that_does_not_import(monkeypatch):
    # installed but broken (say, built for another numpy): warned once, then treated as absent
    monkeypatch.setattr(compiled, "AVAILABLE", True)
    monkeypatch.setattr(compiled, "_module", None)

    def broken():
        raise ImportError("numba: broken for the test")

    monkeypatch.setattr(compiled, "_kernels", broken)
    with pytest.warns(RuntimeWarning, match=r"numba is installed but does not import"):
        assert not compiled.numba_available()
    a, b = torch.rand(40, 3), torch.randn(40, 3)
    assert choose_backend(40, 3, 1, False, torch.float32, torch.device("cpu")) == "parallel"
    with pytest.raises(ValueError, match=r"backend='numba' cannot run"):
        paraseq.linear_scan(a, b, backend="numba")


def test_cpu_tensors_only(numba):
    a, b = torch.rand(40, 3, device="meta"), torch.randn(40, 3, device="meta")
    with pytest.raises(ValueError, match=r"backend='numba' cannot run: it does not run on meta "
                                         r"tensors; or use backend='auto'"):
        paraseq.linear_scan(a, b, backend="numba")


def test_import_compiles_nothing():
    code = "import sys, paraseq; sys.exit(int('numba' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_concurrent_calls_from_python_threads(numba, threaded):
    # one call at a time uses the pool; the others run alone, and every result is right
    cases = [make((2,), (2,), (2,), 3000 + 17 * i, 1 + 8 * (i % 3), dense=False,
                  dtype=torch.float64, seed=i) for i in range(12)]

    def one(i):
        a, b, x0 = cases[i]
        x = paraseq.linear_scan(a, b, x0, reverse=bool(i % 2), backend="numba")
        ref = scan_numpy(np_of(a), np_of(b), np_of(x0), dense=False, reverse=bool(i % 2))
        return float(np.abs(x.numpy() - ref).max())

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        errors = list(ex.map(one, range(len(cases))))
    assert max(errors) < 1e-10


_FORK_INPUTS: list[torch.Tensor] = []


def _scan_in_child(queue):
    # no torch op that could enter the parent's OpenMP pool: only the numba backend
    torch.set_num_threads(2)
    a, b = _FORK_INPUTS
    queue.put(compiled.numba_scan(a, b, None, dense=False, plan=("narrow", 16, 512)).numpy())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_in_a_forked_child(numba, threaded):
    # the parent's thread pool does not survive a fork; the child makes its own
    a, b = torch.rand(1, 50_000, 1), torch.randn(1, 50_000, 1)  # (B, T, D)
    want = compiled.numba_scan(a, b, None, dense=False, plan=("narrow", 16, 512))
    _FORK_INPUTS[:] = [a, b]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_scan_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert np.array_equal(got, want.numpy())
