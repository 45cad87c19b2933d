"""The "triton" linear_scan backend against the float64 loop.

On a machine without a GPU the kernels run through triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported); the sizes stay small because the interpreter
executes every program in NumPy. Skipped where triton is not installed.

Shape letters: T time steps, D state size, B batch.
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
from paraseq.scan.api import choose_backend  # noqa: E402

# marked so that benchmarks/gpu.py (pytest -m cuda) runs these on the GPU; without one
# they run here all the same (through triton's interpreter)
pytestmark = pytest.mark.cuda
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
TOL = {torch.float32: 2e-6, torch.complex64: 2e-6, torch.float64: 1e-13, torch.complex128: 1e-13}


def rnd(*shape, dtype, g):
    real = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
    if dtype.is_complex:
        real = torch.complex(real, torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1)
        real = real / real.abs().clamp_min(1.0)
    return real.to(dtype)


def check(x, ref):
    ref = torch.from_numpy(ref)
    scale = max(1.0, ref.abs().max().item())
    return (x.cpu().to(ref.dtype) - ref).abs().max().item() / scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("batch_a", "batch_b", "batch_x0", "T", "D"), [
    ((), (), (), 1, 1),
    ((2,), (2,), (2,), 3, 5),
    ((1,), (3,), None, 130, 2),  # a shared across the batch, x0 = 0, tiles plus a remainder
    ((2, 1), (2,), (1,), 5, 33),  # channels over two programs (BLOCK_D = 32)
    ((), (2,), (2,), 64, 1),  # exactly one tile
])
def test_matches_the_float64_loop(dtype, reverse, batch_a, batch_b, batch_x0, T, D):
    g = torch.Generator().manual_seed(T * 31 + D)
    a = rnd(*batch_a, T, D, dtype=dtype, g=g)
    b = rnd(*batch_b, T, D, dtype=dtype, g=g)
    x0 = None if batch_x0 is None else rnd(*batch_x0, D, dtype=dtype, g=g)
    x = paraseq.linear_scan(a.to(DEVICE), b.to(DEVICE),
                            None if x0 is None else x0.to(DEVICE), reverse=reverse,
                            backend="triton")
    ref = scan_numpy(a.numpy(), b.numpy(), None if x0 is None else x0.numpy(), dense=False,
                     reverse=reverse)
    assert x.shape == ref.shape and x.dtype == dtype and x.device.type == DEVICE.type
    assert check(x, ref) <= TOL[dtype]


def test_low_precision_and_nonfinite_follow_the_loop():
    g = torch.Generator().manual_seed(0)
    a = rnd(2, 40, 3, dtype=torch.float32, g=g)
    b = rnd(2, 40, 3, dtype=torch.float32, g=g)
    x = paraseq.linear_scan(a.to(DEVICE).half(), b.to(DEVICE).half(), backend="triton")
    assert x.dtype == torch.float16
    ref = scan_numpy(a.half().float().numpy(), b.half().float().numpy(), dense=False)
    assert check(x.float(), ref) <= 1e-2
    b[0, 5, 1] = float("nan")
    b[1, 7, 2] = float("inf")
    a[1, :, 2] = 0.5
    x = paraseq.linear_scan(a.to(DEVICE), b.to(DEVICE), backend="triton").cpu()
    loop = paraseq.linear_scan(a, b, backend="sequential")
    assert torch.equal(x.isnan(), loop.isnan()) and torch.equal(x.isinf(), loop.isinf())


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_are_the_adjoint_scan(reverse):
    """The backward is one reverse linear_scan on the same backend; gradcheck in float64 and
    against autograd through a plain loop."""
    g = torch.Generator().manual_seed(1)
    a = rnd(1, 6, 2, dtype=torch.float64, g=g).to(DEVICE).requires_grad_()
    b = rnd(2, 6, 2, dtype=torch.float64, g=g).to(DEVICE).requires_grad_()
    x0 = rnd(2, dtype=torch.float64, g=g).to(DEVICE).requires_grad_()
    assert gradcheck(lambda a, b, x0: paraseq.linear_scan(a, b, x0, reverse=reverse,
                                                          backend="triton"), (a, b, x0))
    w = torch.randn(2, 6, 2, generator=g, dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad((paraseq.linear_scan(a, b, x0, reverse=reverse,
                                                   backend="triton") * w).sum(), (a, b, x0))
    want = torch.autograd.grad((scan_autograd(a, b, x0, dense=False, reverse=reverse)
                                * w).sum(), (a, b, x0))
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_wide_dense_runs_the_parallel_scan_on_the_device():
    g = torch.Generator().manual_seed(2)
    a = rnd(2, 3, 65, 65, dtype=torch.float64, g=g) / 65  # D > DENSE_MAX_D
    b = rnd(2, 3, 65, dtype=torch.float64, g=g)
    x = paraseq.linear_scan(a.to(DEVICE), b.to(DEVICE), backend="triton")
    assert check(x, scan_numpy(a.numpy(), b.numpy(), dense=True)) <= 1e-13


def test_auto_picks_triton_for_diagonal_cuda_problems():
    cuda = torch.device("cuda")
    assert choose_backend(10_000, 64, 16, False, torch.float32, cuda) == "triton"
    assert choose_backend(10_000, 64, 16, False, torch.complex64, cuda) == "triton"
    assert choose_backend(10_000, 8, 16, True, torch.float32, cuda) == "triton"
    assert choose_backend(10_000, 65, 16, True, torch.float32, cuda) == "parallel"
    assert choose_backend(8, 64, 16, False, torch.float32, cuda) == "sequential"


@pytest.mark.skipif(CUDA, reason="the CPU-only error")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not gpu.triton_available(torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend='triton' cannot run.*TRITON_INTERPRET=1"):
        paraseq.linear_scan(torch.rand(5, 2), torch.rand(5, 2), backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(gpu, "AVAILABLE", False)
    assert not gpu.triton_available()
    assert choose_backend(10_000, 64, 16, False, torch.float32,
                          torch.device("cuda")) != "triton"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run.*pip install triton"):
        paraseq.linear_scan(torch.rand(5, 2), torch.rand(5, 2), backend="triton")
