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
data (12 bytes per float32 element: read a, read b, write x).

Dense a (..., T, D, D) with D <= ``DENSE_MAX_D`` (64; complex D <= 32): ``dense_triton_scan``,
a two-level scan over chunks of ``DENSE_CHUNK`` steps (see ``_triton_kernels``), float32 and
float64. Complex dense a is scanned as the real 2D x 2D system [[Re a, -Im a], [Im a, Re a]]
acting on (Re x, Im x) (Triton has no complex type; the real form is exact, at 2x the
multiplies of complex arithmetic). Wider dense a goes to the pure-torch ``"parallel"`` scan on
the same device, whose batched matmuls are what a GPU runs well at large D.

Why chunks rather than the pure-torch tree for small D: the odd-even tree of ``"parallel"``
issues a handful of torch ops per level of 2 log2(T) levels, each a kernel launch reading and
writing its level's matrices, where a (D, D) product is too small to fill a GPU. Counted
(``benchmarks/gpu.py``'s "scan" section, ``op_counts``; any machine), one dense scan of
(1, T, 4, 4): the tree 139, 195 and 244 non-view torch ops at T = 1e3, 1e4, 1e5; the chunked
path 3, 5 and 5 Triton launches (2 a level and the last level's 1) plus 6, 10 and 10 torch
ops (allocations, the carries' concatenation). It reads a twice and writes x once; each
program's chain of DENSE_CHUNK small products runs in registers. The time ratio on a GPU is
the same section's timed rows, still to be taken.
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
DENSE_MAX_D = 64  # the largest dense state one program holds (real form: complex D <= 32)
DENSE_CHUNK = 64  # steps a dense program walks

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
    if b.dtype not in SUPPORTED:
        raise TypeError(f"linear_scan: backend='triton' takes float32, float64, complex64 or "
                        f"complex128 (linear_scan computes bfloat16 and float16 in float32); "
                        f"got {b.dtype}")
    if dense:
        if dense_fits(b.shape[-1], b.dtype):
            return dense_triton_scan(a, b, x0, reverse=reverse)
        return parallel_scan(a, b, x0, dense=True, reverse=reverse)
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


def dense_fits(D: int, dtype: torch.dtype) -> bool:
    """Whether dense a with state size D runs as the Triton kernels (else the torch tree)."""
    return dtype in SUPPORTED and D * (2 if dtype.is_complex else 1) <= DENSE_MAX_D


def _real_form(a: Tensor, b: Tensor, x0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Complex (N, T, D, D), (N, T, D), (N, D) as the real system of twice the size."""
    ar, ai = a.real, a.imag
    a2 = torch.cat([torch.cat([ar, -ai], dim=-1), torch.cat([ai, ar], dim=-1)], dim=-2)
    return (a2.contiguous(), torch.cat([b.real, b.imag], dim=-1).contiguous(),
            torch.cat([x0.real, x0.imag], dim=-1).contiguous())


def _dense_rows(a: Tensor, b: Tensor, x0: Tensor, reverse: bool) -> Tensor:
    """a (N, T, D, D), b (N, T, D), x0 (N, D), contiguous, real: x (N, T, D)."""
    N, T, D = b.shape
    K = -(-T // DENSE_CHUNK)  # chunks
    block_d = max(1, 1 << (D - 1).bit_length())
    use_dot = block_d >= 16
    # one warp holds a tiny state's tile; tl.dot's tiles want more (a guess until the GPU
    # section times it)
    warps = 1 if block_d <= 8 else 4
    kern = _kernels()
    if K == 1:
        carry_in = x0.unsqueeze(1)  # (N, 1, D)
    else:
        A = torch.empty((N, K, D, D), dtype=b.dtype, device=b.device)  # (N, K, D, D)
        B = torch.empty((N, K, D), dtype=b.dtype, device=b.device)  # (N, K, D)
        kern.dense_chunk_reduce_kernel[(N * K,)](a, b, A, B, T, D, K, REVERSE=reverse,
                                                 CHUNK=DENSE_CHUNK, BLOCK_D=block_d,
                                                 USE_DOT=use_dot, num_warps=warps)
        ends = _dense_rows(A, B, x0, False)  # (N, K, D): the state after each chunk
        carry_in = torch.cat([x0.unsqueeze(1), ends[:, :-1]], dim=1).contiguous()
    x = torch.empty_like(b)  # (N, T, D)
    kern.dense_chunk_apply_kernel[(N * K,)](a, b, carry_in, x, T, D, K, REVERSE=reverse,
                                            CHUNK=DENSE_CHUNK, BLOCK_D=block_d,
                                            num_warps=warps)
    return x


def dense_triton_scan(a: Tensor, b: Tensor, x0: Tensor | None, *, reverse: bool) -> Tensor:
    """Dense a (..., T, D, D) with D <= DENSE_MAX_D (complex: D <= DENSE_MAX_D / 2), float32,
    float64, complex64 or complex128: x (..., T, D) by the chunked Triton kernels."""
    T, D = b.shape[-2], b.shape[-1]
    batch = batch_shape_of(a, b, x0, True)
    a_r = _rows(a, batch, (T, D, D))  # (N, T, D, D)
    b_r = _rows(b, batch, (T, D))  # (N, T, D)
    x0_r = _rows(b.new_zeros(D) if x0 is None else x0, batch, (D,))  # (N, D)
    if a_r.shape[0] == 0:
        return torch.empty((*batch, T, D), dtype=b.dtype, device=b.device)
    if b.is_complex():
        x2 = _dense_rows(*_real_form(a_r, b_r, x0_r), reverse)  # (N, T, 2 D)
        x = torch.complex(x2[..., :D], x2[..., D:])
    else:
        x = _dense_rows(a_r, b_r, x0_r, reverse)
    return x.reshape(*batch, T, D)


def dense_chunked_twin(a: Tensor, b: Tensor, x0: Tensor | None, *, reverse: bool,
                       chunk: int | None = None) -> Tensor:
    """The dense kernels' algorithm in plain torch ops, for testing (differentiable by
    autograd, any device, any dtype; not a backend: 2 ``chunk`` ops a level).

    The same two levels as ``_dense_rows``: per (row, chunk), the chunk's composed map
    (A_k, B_k) step by step in scan order, the chunks' maps scanned one level up (the same
    function), then each chunk re-run from its carried-in state. Steps past T are padded with
    the identity map. a (..., T, D, D), b (..., T, D), x0 (..., D) or None -> x (..., T, D).
    """
    chunk = DENSE_CHUNK if chunk is None else chunk
    T, D = b.shape[-2], b.shape[-1]
    batch = batch_shape_of(a, b, x0, True)
    a = a.expand(*batch, T, D, D).reshape(-1, T, D, D)  # (N, T, D, D)
    b = b.expand(*batch, T, D).reshape(-1, T, D)  # (N, T, D)
    x0 = (b.new_zeros(b.shape[0], D) if x0 is None
          else x0.expand(*batch, D).reshape(-1, D))  # (N, D)
    if reverse:
        a, b = a.flip(1), b.flip(1)
    x = _twin_rows(a, b, x0, chunk)
    return (x.flip(1) if reverse else x).reshape(*batch, T, D)


def _twin_rows(a: Tensor, b: Tensor, x0: Tensor, chunk: int) -> Tensor:
    N, T, D = b.shape
    K = -(-T // chunk)
    pad = K * chunk - T
    eye = torch.eye(D, dtype=a.dtype, device=a.device)
    a_p = torch.cat([a, eye.expand(N, pad, D, D)], 1).reshape(N, K, chunk, D, D)
    b_p = torch.cat([b, b.new_zeros(N, pad, D)], 1).reshape(N, K, chunk, D)
    if K == 1:
        carry_in = x0.unsqueeze(1)  # (N, 1, D)
    else:
        A = eye.expand(N, K, D, D)  # (N, K, D, D)
        B = b.new_zeros(N, K, D)  # (N, K, D)
        for s in range(chunk):
            A = a_p[:, :, s] @ A
            B = (a_p[:, :, s] @ B.unsqueeze(-1)).squeeze(-1) + b_p[:, :, s]
        ends = _twin_rows(A, B, x0, chunk)  # (N, K, D)
        carry_in = torch.cat([x0.unsqueeze(1), ends[:, :-1]], dim=1)
    xs = []
    state = carry_in  # (N, K, D)
    for s in range(chunk):
        state = (a_p[:, :, s] @ state.unsqueeze(-1)).squeeze(-1) + b_p[:, :, s]
        xs.append(state)
    return torch.stack(xs, dim=2).reshape(N, K * chunk, D)[:, :T]
