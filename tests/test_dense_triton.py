"""Dense a on the "triton" linear_scan backend (paraseq.scan.gpu.dense_triton_scan) against the
float64 loop, forward and backward.

Without a GPU the kernels run through triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), which executes every program in NumPy one step at a
time: the sizes stay small, and the chunk length is cut to 4 steps in most cases so that a
short sequence still takes the two-level path with a remainder chunk and a recursion (T = 37:
10 chunks, then 3, then 1). On a CUDA machine the same tests run on the GPU (``-m cuda``).

Shape letters: T time steps, D state size.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before triton is imported: it reads the variable then
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from reference import scan_autograd, scan_numpy  # noqa: E402
from torch.autograd import gradcheck  # noqa: E402

import paraseq  # noqa: E402
from paraseq.scan import gpu  # noqa: E402

# marked so that benchmarks/gpu.py (pytest -m cuda) runs these on the GPU; without one
# they run here all the same (through triton's interpreter)
pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.float64: 1e-12,
       torch.complex128: 1e-12}


@pytest.fixture
def short_chunks(monkeypatch):
    monkeypatch.setattr(gpu, "DENSE_CHUNK", 4)


def rnd(*shape, dtype, g, scale=1.0):
    x = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    if dtype.is_complex:
        x = torch.complex(x, (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1)
                          * scale)
    return x.to(dtype)


def run(a, b, x0, reverse):
    x = paraseq.linear_scan(a.to(DEVICE), b.to(DEVICE), None if x0 is None else x0.to(DEVICE),
                            reverse=reverse, backend="triton", structure="dense")
    ref = torch.from_numpy(scan_numpy(a.numpy(), b.numpy(), None if x0 is None else x0.numpy(),
                                      dense=True, reverse=reverse))
    assert x.shape == ref.shape and x.dtype == a.dtype and x.device.type == DEVICE.type
    return (x.cpu().to(ref.dtype) - ref).abs().max().item() / max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64,
                                   torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch_a", "batch_b", "batch_x0", "T", "D"), [
    ((), (), (), 1, 1),
    ((2,), (2,), (2,), 37, 3),  # 10 chunks of 4 (the last one short), then 3, then 1
    ((1,), (3,), None, 9, 5),  # a shared across the batch, x0 = 0
    ((), (2,), (1,), 6, 17),  # tl.dot's tiles (D padded to 32)
])
def test_matches_the_float64_loop(short_chunks, dtype, reverse, batch_a, batch_b, batch_x0,
                                  T, D):
    g = torch.Generator().manual_seed(T * 31 + D)
    a = rnd(*batch_a, T, D, D, dtype=dtype, g=g, scale=1.5 / D)
    b = rnd(*batch_b, T, D, dtype=dtype, g=g)
    x0 = None if batch_x0 is None else rnd(*batch_x0, D, dtype=dtype, g=g)
    assert run(a, b, x0, reverse) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.complex64])
def test_default_chunks_with_a_remainder(dtype):
    """The shipped chunk length: T = 70 is one full chunk of 64 and one of 6."""
    g = torch.Generator().manual_seed(5)
    a = rnd(70, 2, 2, dtype=dtype, g=g, scale=0.7)
    b = rnd(2, 70, 2, dtype=dtype, g=g)
    assert run(a, b, rnd(2, dtype=dtype, g=g), False) <= TOL[dtype]


def test_wide_complex_state_leaves_the_kernels(monkeypatch):
    """Complex dense a runs as a real system of twice the size, so complex D fits up to
    DENSE_MAX_D / 2; past that (and real D past DENSE_MAX_D) the torch tree runs."""
    assert gpu.dense_fits(64, torch.float32) and not gpu.dense_fits(65, torch.float32)
    assert gpu.dense_fits(32, torch.complex64) and not gpu.dense_fits(33, torch.complex64)
    monkeypatch.setattr(gpu, "DENSE_MAX_D", 4)
    calls = []
    monkeypatch.setattr(gpu, "dense_triton_scan", lambda *a, **k: calls.append(1))
    g = torch.Generator().manual_seed(6)
    a = rnd(5, 3, 3, dtype=torch.complex128, g=g, scale=0.5)  # real form 6 > 4
    b = rnd(5, 3, dtype=torch.complex128, g=g)
    assert run(a, b, None, False) <= 1e-12 and not calls


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_are_the_adjoint_scan_on_the_kernels(short_chunks, reverse):
    """The backward is one reverse linear_scan with the transposed matrices on the same
    kernels: the gradients of autograd through a plain loop (gradcheck runs on the twin
    below: each of its calls here would be an interpreted run)."""
    g = torch.Generator().manual_seed(7)
    a = rnd(1, 5, 2, 2, dtype=torch.float64, g=g, scale=0.8).to(DEVICE).requires_grad_()
    b = rnd(2, 5, 2, dtype=torch.float64, g=g).to(DEVICE).requires_grad_()
    x0 = rnd(2, dtype=torch.float64, g=g).to(DEVICE).requires_grad_()

    def f(a, b, x0):
        return paraseq.linear_scan(a, b, x0, reverse=reverse, backend="triton")

    w = torch.randn(2, 5, 2, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((f(a, b, x0) * w).sum(), (a, b, x0))
    want = torch.autograd.grad((scan_autograd(a, b, x0, dense=True, reverse=reverse)
                                * w).sum(), (a, b, x0))
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_low_precision_is_computed_in_float32(short_chunks):
    g = torch.Generator().manual_seed(8)
    a = rnd(2, 11, 3, 3, dtype=torch.float32, g=g, scale=0.5)
    b = rnd(2, 11, 3, dtype=torch.float32, g=g)
    x = paraseq.linear_scan(a.to(DEVICE).bfloat16(), b.to(DEVICE).bfloat16(), backend="triton")
    assert x.dtype == torch.bfloat16
    ref = scan_numpy(a.bfloat16().float().numpy(), b.bfloat16().float().numpy(), dense=True)
    assert (x.cpu().double() - torch.from_numpy(ref)).abs().max() <= 2e-2


@pytest.mark.parametrize("reverse", [False, True])
def test_the_torch_twin_is_the_loop_and_gradchecks(short_chunks, reverse):
    """gpu.dense_chunked_twin: the kernels' algorithm (chunks, the chunk maps, the recursion,
    the identity padding) in torch ops, equal to the float64 loop and differentiable by
    autograd; gradcheck on it (full mode: it is cheap), and the kernels agree with it."""
    g = torch.Generator().manual_seed(9)
    a = rnd(2, 11, 3, 3, dtype=torch.float64, g=g, scale=0.6)
    b = rnd(2, 11, 3, dtype=torch.float64, g=g)
    x0 = rnd(2, 3, dtype=torch.float64, g=g)
    twin = gpu.dense_chunked_twin(a, b, x0, reverse=reverse, chunk=2)  # 6 chunks, 3, 2, 1
    ref = scan_numpy(a.numpy(), b.numpy(), x0.numpy(), dense=True, reverse=reverse)
    torch.testing.assert_close(twin, torch.from_numpy(ref), rtol=1e-13, atol=1e-13)
    small = [t[:1, :5].clone().requires_grad_() for t in (a, b)] + [
        x0[:1].clone().requires_grad_()]
    assert gradcheck(lambda a, b, x0: gpu.dense_chunked_twin(a, b, x0, reverse=reverse,
                                                               chunk=2), small)
    got = paraseq.linear_scan(a.to(DEVICE), b.to(DEVICE), x0.to(DEVICE), reverse=reverse,
                              backend="triton")
    torch.testing.assert_close(got.cpu(), twin, rtol=1e-13, atol=1e-13)


def test_no_triton_on_cuda_takes_the_torch_tree(monkeypatch):
    """triton missing on a CUDA machine: auto runs the pure-torch tree for dense a."""
    from paraseq.scan.api import choose_backend

    cuda = torch.device("cuda")
    assert choose_backend(10_000, 8, 16, True, torch.float32, cuda) == "triton"
    monkeypatch.setattr(gpu, "AVAILABLE", False)
    assert choose_backend(10_000, 8, 16, True, torch.float32, cuda) == "parallel"
    assert choose_backend(10_000, 8, 16, True, torch.bfloat16, cuda) == "parallel"


def test_a_dtype_the_kernels_lack_is_a_type_error():
    """linear_scan hands bfloat16/float16 over as float32 (above); the backend function itself
    names what it takes."""
    a, b = torch.rand(4, 2, 2, dtype=torch.float16), torch.rand(4, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"float32, float64.*got torch.float16"):
        gpu.triton_scan(a.to(DEVICE), b.to(DEVICE), None, dense=True, reverse=False)
