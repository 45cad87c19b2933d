"""The ``"triton"`` backend: Triton kernels for ``linear_scan`` on GPUs.

Shape letters: T time steps, D state size, ``...`` leading (batch) dims; N the flattened
broadcast batch.

triton is optional. Whether it is installed is looked up when paraseq is imported (a file-system
lookup, ``AVAILABLE``); triton itself is imported, and the kernels of ``_triton_kernels.py``
decorated, on the first call that runs them. The backend runs:

- on CUDA (or ROCm) tensors, where triton compiles the kernels for the device;
- on CPU tensors only under triton's interpreter (``TRITON_INTERPRET=1`` in the environment
  before triton is imported): slow, and meant for testing the kernels on a machine without a
  GPU (tests/test_triton.py).

What it computes: diagonal a, float32, float64, complex64 and complex128 (``linear_scan`` hands
bfloat16 and float16 over as float32), forward and reverse. Each program owns one batch row
and a block of channels and walks time in tiles scanned in log depth, carrying the state from
tile to tile (see ``_triton_kernels``): parallel over rows and channels, one pass over the
data (12 bytes per float32 element: read a, read b, write x). Dense a (..., T, D, D) is not a
Triton kernel here: this backend hands it to the pure-torch ``"parallel"`` scan on the same
device, whose batched matmuls are what a GPU runs well.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch
from torch import Tensor

from ._ops import batch_shape_of
from .parallel import parallel_scan

AVAILABLE = importlib.util.find_spec("triton") is not None
"""Whether triton is installed (looked up at import; triton is not imported until first use)."""

INSTALL_HINT = "pip install triton (it comes with CUDA builds of torch)"
SUPPORTED = (torch.float32, torch.float64, torch.complex64, torch.complex128)
BLOCK_T = 64  # time steps per tile
BLOCK_D = 32  # channels per program

_module = None


def interpreted() -> bool:
    """Whether triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on the CPU.
    triton reads the variable when it is imported, so setting it after that does not count."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    if "triton" not in sys.modules:
        return True
    try:  # imported with the interpreter on, triton's own library functions are interpreted
        from triton.language import standard
        return type(standard.sum).__name__ == "InterpretedFunction"
    except (ImportError, AttributeError):
        return True


def triton_available(device: torch.device | None = None) -> bool:
    """Whether the ``"triton"`` backend can run on ``device`` (any device if None): triton is
    installed, and the device is a GPU, or the CPU under ``TRITON_INTERPRET=1``."""
    if not AVAILABLE:
        return False
    if device is None:
        return torch.cuda.is_available() or interpreted()
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


def _kernels():
    global _module
    if _module is None:
        _module = importlib.import_module("._triton_kernels", __package__)
    return _module


def _rows(t: Tensor, batch: torch.Size, tail: tuple[int, ...]) -> Tensor:
    """t broadcast to (*batch, *tail), flattened to (N, *tail), contiguous."""
    return t.expand(*batch, *tail).reshape(-1, *tail).resolve_conj().resolve_neg().contiguous()


def triton_scan(a: Tensor, b: Tensor, x0: Tensor | None, *, dense: bool,
                reverse: bool) -> Tensor:
    """The ``"triton"`` backend function (see ``paraseq.scan.api.Backend``)."""
    if not triton_available(b.device):
        where = ("CPU tensors need triton's interpreter: set TRITON_INTERPRET=1 before triton "
                 "is imported" if b.device.type == "cpu" else f"it does not run on {b.device}")
        if not AVAILABLE:
            where = f"triton is not installed ({INSTALL_HINT})"
        raise ValueError(f"linear_scan: backend='triton' cannot run here: {where}; or use "
                         f"backend='auto'")
    if dense:
        return parallel_scan(a, b, x0, dense=True, reverse=reverse)
    if b.dtype not in SUPPORTED:
        raise TypeError(f"linear_scan: backend='triton' takes float32, float64, complex64 or "
                        f"complex128; got {b.dtype}")
    T, D = b.shape[-2], b.shape[-1]
    batch = batch_shape_of(a, b, x0, dense)
    a_r = _rows(a, batch, (T, D))  # (N, T, D)
    b_r = _rows(b, batch, (T, D))  # (N, T, D)
    # a zero start, not none: the loop's 0 * a_1 keeps a nan or inf of a_1
    x0_r = _rows(b.new_zeros(D) if x0 is None else x0, batch, (D,))  # (N, D)
    N = a_r.shape[0]
    x = torch.empty_like(b_r)  # (N, T, D)
    if N == 0:
        return x.reshape(*batch, T, D)
    kern = _kernels()
    if b.is_complex():
        args = [torch.view_as_real(t) for t in (a_r, b_r)]
        x0_arg = torch.view_as_real(x0_r) if x0_r is not None else args[1]
        out = torch.view_as_real(x)
        fn = kern.diag_scan_complex_kernel
    else:
        args = [a_r, b_r]
        x0_arg = x0_r if x0_r is not None else b_r  # a placeholder pointer when HAS_X0 is off
        out = x
        fn = kern.diag_scan_kernel
    block_d = min(BLOCK_D, max(1, 1 << (D - 1).bit_length()))
    grid = (N, -(-D // block_d))
    fn[grid](*args, x0_arg, out, T, D, HAS_X0=x0_r is not None, REVERSE=reverse,
             BLOCK_T=BLOCK_T, BLOCK_D=block_d)
    return x.reshape(*batch, T, D)
