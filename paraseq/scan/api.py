"""``linear_scan``: input checks, the backend registry, and the adjoint gradient.

Shape letters: T time steps, D state size, ``...`` leading (batch) dims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import compiled, gpu
from ._ops import a_time, adjoint, apply, batch_shape_of
from .chunked import chunked_scan
from .compiled import numba_scan
from .gpu import triton_scan
from .parallel import parallel_scan
from .sequential import sequential_scan

ScanFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Backend:
    """A way to solve the recurrence.

    ``fn(a, b, x0, *, dense, reverse)`` gets tensors of one floating or complex dtype whose
    leading dims broadcast, and returns x with the full broadcast batch shape. It runs under
    ``torch.no_grad``: gradients are paraseq's adjoint, never autograd through the backend.
    """

    name: str
    fn: ScanFn
    description: str
    # whether it runs on a device (any device the machine has, for None)
    is_available: Callable[..., bool] = lambda device=None: True
    missing: str = ""  # what an unavailable backend needs, and how to get it


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sequential", sequential_scan, "the plain loop over time: the reference"),
        Backend("parallel", parallel_scan,
                "log-depth odd-even (work-efficient, Blelloch-type) reduction in pure torch"),
        Backend("chunked", chunked_scan,
                "two-level scan: loops inside chunks vectorised over chunks, then the carries"),
        Backend("numba", numba_scan,
                "compiled CPU kernels (numba): parallel over channels, or over time chunks",
                is_available=compiled.numba_available,
                missing=f"it needs the numba package, which is not installed (or does not "
                        f"import); install it ({compiled.INSTALL_HINT})"),
        Backend("triton", triton_scan,
                "Triton kernels for GPUs: tiles scanned in log depth, parallel over rows and "
                "channels; dense a with D <= 64 in chunks, wider dense a the 'parallel' scan); on "
                "the CPU only under TRITON_INTERPRET=1",
                is_available=gpu.triton_available,
                missing=f"it needs the triton package ({gpu.INSTALL_HINT}) and a GPU, or "
                        f"TRITON_INTERPRET=1 for CPU tensors"),
    )
}
"""Every backend by name; ``"auto"`` picks one of them (see ``choose_backend``)."""

_SEQUENTIAL_MAX_T = 16
_NUMBA_MIN_T = 3
_CHUNKED_MIN_WIDTH = 32
_REAL = (torch.float32, torch.float64)
_COMPLEX = (torch.complex64, torch.complex128)
_LOW = (torch.bfloat16, torch.float16)


def choose_backend(T: int, D: int, batch: int, dense: bool, dtype: torch.dtype,
                   device: torch.device) -> str:
    """The rule behind ``backend="auto"``.

    On a CPU with numba installed (``paraseq.scan.compiled.AVAILABLE``), for every dtype
    ``linear_scan`` takes (bfloat16 and float16 are computed in float32): ``"numba"``, except
    diagonal a with T <= 2, where the plain loop ties it. Measured on this project's 2-core
    Xeon, float32, medians, while other jobs kept the load average at 2 to 3:
    - tiny T: about 90 us a call against the loop's 90 us at T = 2 (one channel; 97 against
      99 us at B*D = 1024), 90 against 135 us at T = 8; dense 4 x 4 86 against 92 us at
      T = 1. Most of the 90 us is ``linear_scan``'s checks and autograd wrapper; the kernel
      takes under 40 us.
    - with data to move, one thread each (the load starves two-thread runs), against the
      fastest pure-torch backend in the same run: 4.1x (T = 1e3, one channel), 5.6x
      (T = 1e5, one channel), 3.9x (T = 1e6, one channel: 1.3 against 5.2 ms for
      "parallel"), 4.5x (T = 1e4, B*D = 64), 3.6x (T = 1e6, B*D = 64: 136 against 489 ms for
      "chunked"), 2.6x (T = 1e4, B*D = 4096); dense a 3.5x (one 2 x 2 system, T = 1e5) to
      20x (16 x 64 x 64, T = 1e3) faster than "parallel".
    Tables: benchmarks/README.md (``benchmarks/scan.py``). The first call in a process pays
    numba's import and the kernels' compile (about 1 to 5 s a kernel and dtype, once per
    machine: numba caches the machine code on disk) or cache load (about 0.5 s); see
    ``benchmarks/scan.py --first-call``.

    Without numba, or off the CPU:
    - T <= 16: ``"sequential"`` (a handful of steps costs less than any scan's set-up).
    - CUDA, diagonal a, triton installed: ``"triton"`` (one pass over the data; the pure-torch
      backends launch a few kernels per tree level or chunk step).
    - CUDA, dense a with D <= 64 (complex: D <= 32), triton installed: ``"triton"``, the chunked
      kernels of ``paraseq.scan.gpu.dense_triton_scan``: 5 Triton launches and 10 torch ops
      at T = 1e5 against the tree's 244 torch ops (counted by ``benchmarks/gpu.py --dry-run
      --sections scan``). Chosen by that count; the GPU timing that is to confirm it is the
      same section's timed rows, still to be taken. Triton missing: ``"parallel"``.
    - CPU, diagonal a, at least 32 scalars per time step (batch * D >= 32): ``"chunked"``,
      which reads the data about twice where the tree reads it about 4 times: as fast as
      ``"parallel"`` at B*D = 64 and T <= 1e5, 1.4x faster at T = 1e6, up to 1.8x at
      B*D = 4096.
    - everything else (narrow diagonal problems, dense a off CUDA, dense a with D > 64 on
      CUDA): ``"parallel"``, which is bound by per-op overhead on narrow problems and needs
      the fewest ops (about 8 per level of log2(T)): 1.6x faster than ``"chunked"`` at
      B*D = 1, T = 1e6. Dense a makes every op a batched matmul, where the log-depth tree
      wins too.
    The numbers behind the thresholds are in benchmarks/README.md (``benchmarks/scan.py``).
    """
    if (device.type == "cpu" and dtype in _REAL + _COMPLEX + _LOW
            and BACKENDS["numba"].is_available()):
        return "numba" if dense or T >= _NUMBA_MIN_T else "sequential"
    if T <= _SEQUENTIAL_MAX_T:
        return "sequential"
    if device.type == "cuda" and dtype in _REAL + _COMPLEX + _LOW and \
            gpu.triton_available(device) and (
                not dense or gpu.dense_fits(D, torch.float32 if dtype in _LOW else dtype)):
        return "triton"
    if device.type == "cpu" and not dense and batch * D >= _CHUNKED_MIN_WIDTH:
        return "chunked"
    return "parallel"


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting: sum grad down to an input's shape."""
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class _LinearScan(torch.autograd.Function):
    """x = scan(a, b, x0) with the adjoint scan as its backward.

    Backward (forward direction; reverse mirrors it): lambda_t = g_t + a_{t+1}^H lambda_{t+1},
    lambda_T = g_T, which is itself a linear scan run the other way. Then dL/db_t = lambda_t,
    dL/da_t = lambda_t conj(x_{t-1}) (outer product for dense a), dL/dx0 = a_1^H lambda_1.
    Only a, x0 and the output x are saved: memory O(T D) beyond the inputs. The backward calls
    ``linear_scan`` itself, so it is differentiable again (double backward works).
    """

    @staticmethod
    def forward(a: Tensor, b: Tensor, x0: Tensor | None, dense: bool, reverse: bool,
                backend: str) -> Tensor:
        out = BACKENDS[backend].fn(a, b, x0, dense=dense, reverse=reverse)
        if backend != "sequential":
            out = _loop_where_nonfinite(out, a, b, x0, dense, reverse)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, _, x0, dense, reverse, backend = inputs
        ctx.dense, ctx.reverse, ctx.backend = dense, reverse, backend
        ctx.has_x0 = x0 is not None
        ctx.b_shape = inputs[1].shape
        ctx.save_for_backward(a, x0, output)
        ctx.save_for_forward(a, x0, output)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, x0, x = ctx.saved_tensors
        dense, reverse = ctx.dense, ctx.reverse
        T = x.shape[-2]
        tdim = -3 if dense else -2
        aH = adjoint(a, dense)
        # coefficient of the adjoint recurrence at t: a^H of the step that reads x_t
        zero = torch.zeros_like(a_time(aH, slice(0, 1), dense))
        if reverse:  # x_t depends on x_{t+1}; adjoint runs forward: lambda_t += a_{t-1}^H lam
            coef = torch.cat([zero, a_time(aH, slice(0, T - 1), dense)], dim=tdim)
        else:
            coef = torch.cat([a_time(aH, slice(1, T), dense), zero], dim=tdim)
        lam = linear_scan(coef, g, None, reverse=not reverse, backend=ctx.backend,
                          structure="dense" if dense else "diagonal")  # (..., T, D)
        grad_a = grad_b = grad_x0 = None
        if ctx.needs_input_grad[0]:
            x_prev = _shifted_states(x, x0, reverse)  # (..., T, D): the state each step reads
            x_prev = x_prev.conj() if x_prev.is_complex() else x_prev
            grad_a = (lam.unsqueeze(-1) * x_prev.unsqueeze(-2)) if dense else lam * x_prev
            grad_a = _sum_to(grad_a, a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(lam, ctx.b_shape)
        if ctx.has_x0 and ctx.needs_input_grad[2]:
            first = T - 1 if reverse else 0
            grad_x0 = _sum_to(apply(a_time(aH, first, dense), lam[..., first, :], dense), x0.shape)
        return grad_a, grad_b, grad_x0, None, None, None

    @staticmethod
    def jvp(ctx, da, db, dx0, *_):
        # tangent: dx_t = a_t dx_{t-1} + (da_t x_{t-1} + db_t), dx_0 = dx0
        a, x0, x = ctx.saved_tensors
        dense = ctx.dense
        rhs = torch.zeros_like(x) if db is None else db
        if da is not None:
            rhs = rhs + apply(da, _shifted_states(x, x0, ctx.reverse), dense)
        return linear_scan(a, rhs, dx0 if ctx.has_x0 else None, reverse=ctx.reverse,
                           backend=ctx.backend, structure="dense" if dense else "diagonal")


def _loop_where_nonfinite(out: Tensor, a: Tensor, b: Tensor, x0: Tensor | None, dense: bool,
                          reverse: bool) -> Tensor:
    """The loop's result wherever a scan's result is not finite.

    A tree or chunked scan multiplies coefficients the loop never multiplies (a_j a_i, a_j b_i),
    so once a nan or inf is in play it can produce nan where the loop has inf, or nan where the
    loop stays finite (inf * 0 in a product of coefficients). One reduction over the result
    (a sum: nan and inf survive it) finds out; only the batch elements whose result holds a
    non-finite value are then computed again by the sequential loop, so the positions of nan
    and inf, and every finite value, are the loop's. Finite results pay the one reduction.
    """
    if out.numel() == 0 or bool(torch.isfinite(out.sum())):
        return out
    T, D = out.shape[-2], out.shape[-1]
    batch = out.shape[:-2]
    flat = out.reshape(-1, T, D)  # (N, T, D), a view of the fresh result
    rows = torch.nonzero(~torch.isfinite(flat).all(-1).all(-1)).flatten()  # (M,)
    if rows.numel() == 0:  # the sum overflowed; every value is finite
        return out
    a_rows = (a.expand(*batch, T, D, D) if dense else a.expand(*batch, T, D)).reshape(
        -1, *a.shape[-3 if dense else -2:])[rows]  # (M, T, D[, D])
    b_rows = b.expand(*batch, T, D).reshape(-1, T, D)[rows]  # (M, T, D)
    x0_rows = None if x0 is None else x0.expand(*batch, D).reshape(-1, D)[rows]  # (M, D)
    flat[rows] = sequential_scan(a_rows, b_rows, x0_rows, dense=dense, reverse=reverse)
    return flat.reshape(out.shape) if flat.data_ptr() != out.data_ptr() else out


def _shifted_states(x: Tensor, x0: Tensor | None, reverse: bool) -> Tensor:
    """The state each step reads: x_{t-1} (x_{t+1} for reverse), with x0 (or 0) at the edge."""
    edge = (torch.zeros_like(x[..., :1, :]) if x0 is None
            else x0.unsqueeze(-2).expand(*x.shape[:-2], 1, x.shape[-1]))
    if reverse:
        return torch.cat([x[..., 1:, :], edge], dim=-2)
    return torch.cat([edge, x[..., :-1, :]], dim=-2)


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"a tensor of shape {tuple(t.shape)}, dtype {t.dtype} on {t.device}"
    return f"{type(t).__name__}"


def _broadcasts(s1: torch.Size, s2: torch.Size) -> bool:
    try:
        torch.broadcast_shapes(s1, s2)
    except RuntimeError:
        return False
    return True


def _resolve_structure(a: Tensor, b: Tensor, structure: str) -> bool:
    """True for dense a (..., T, D, D), False for diagonal a (..., T, D)."""
    T, D = b.shape[-2], b.shape[-1]
    dense_fits = a.dim() >= 3 and tuple(a.shape[-3:]) == (T, D, D)
    diag_fits = tuple(a.shape[-2:]) == (T, D)
    if structure == "dense":
        if not dense_fits:
            raise ValueError(f"linear_scan: structure='dense' needs a of shape (..., T, D, D) = "
                             f"(..., {T}, {D}, {D}) to match b {tuple(b.shape)}; got a of shape "
                             f"{tuple(a.shape)}")
        return True
    if structure == "diagonal":
        if not diag_fits:
            raise ValueError(f"linear_scan: structure='diagonal' needs a of shape (..., T, D) = "
                             f"(..., {T}, {D}) to match b {tuple(b.shape)}; got a of shape "
                             f"{tuple(a.shape)}")
        return False
    if structure != "auto":
        raise ValueError(f"linear_scan: structure must be 'auto', 'diagonal' or 'dense'; got "
                         f"{structure!r}")
    # a reading holds when its shape fits and a's leading dims then broadcast with b's. Both
    # hold only when T == D: a (T, T, D) with b (T, D) is shared dense matrices or a batch of T
    # diagonal coefficients
    dense_ok = dense_fits and _broadcasts(a.shape[:-3], b.shape[:-2])
    diag_ok = diag_fits and _broadcasts(a.shape[:-2], b.shape[:-2])
    if dense_ok and diag_ok:
        raise ValueError(
            f"linear_scan: a of shape {tuple(a.shape)} with b of shape {tuple(b.shape)} reads "
            f"both as diagonal coefficients with a batch dim and as dense (T, D, D) matrices "
            f"shared across the batch (T == D == {D}); pass structure='diagonal' or "
            f"structure='dense'")
    if dense_ok or diag_ok:
        return dense_ok
    # neither broadcasts: the reading by shape, whose broadcast error then names the shapes
    if dense_fits and (a.dim() > b.dim() or not diag_fits):
        return True
    if diag_fits:
        return False
    raise ValueError(
        f"linear_scan: a must be diagonal coefficients of shape (..., T, D) = (..., {T}, {D}) or "
        f"dense matrices of shape (..., T, D, D) = (..., {T}, {D}, {D}) to match b of shape "
        f"{tuple(b.shape)}; got a of shape {tuple(a.shape)}")


def linear_scan(
    a: Tensor,
    b: Tensor,
    x0: Tensor | None = None,
    *,
    reverse: bool = False,
    backend: str = "auto",
    structure: str = "auto",
) -> Tensor:
    """Solve the linear recurrence x_t = a_t x_{t-1} + b_t for t = 1..T, in parallel over T.

    Args:
        a: the coefficients: diagonal, shape (..., T, D) (x_t = a_t * x_{t-1} + b_t,
            elementwise), or dense, shape (..., T, D, D) (x_t = a_t @ x_{t-1} + b_t).
        b: the inputs, shape (..., T, D).
        x0: the initial state x_0, shape (..., D); None means zeros.
        reverse: run from the end instead: x_t = a_t x_{t+1} + b_t with x_{T+1} = x0.
        backend: ``"auto"`` (see ``choose_backend``) or a name in ``paraseq.scan.BACKENDS``:
            ``"sequential"``, ``"parallel"``, ``"chunked"``, ``"numba"`` (CPU only; needs
            the optional numba package), ``"triton"`` (GPU; needs triton; CPU tensors only
            under ``TRITON_INTERPRET=1``).
        structure: ``"auto"``, ``"diagonal"`` or ``"dense"``. ``"auto"`` reads it from the
            shapes: dense when a's last three dims are (T, D, D), diagonal when its last two are
            (T, D). When both fit (T == D, and a's leading dims broadcast with b's under both
            readings, so a's third-last dim could be a batch dim or the time dim of dense
            matrices) it raises rather than guess: say which.

    Returns:
        x, shape (..., T, D), where ``...`` is the broadcast of the leading dims of a, b and x0
        (coefficients shared across a batch need not be expanded). Same dtype as b.

    Dtypes: float32, float64, complex64, complex128; bfloat16 and float16 are computed in
    float32 and returned in their own dtype. a, b and x0 must share one dtype and one device,
    and the result is on that device.

    Gradients flow to a, b and x0 through the adjoint: one reverse linear scan on the same
    backend (see ``_LinearScan``), not autograd through the scan's internals. Forward-mode AD
    (``torch.func.jvp``) works too.

    NaN and inf: no backend masks or repairs them; they spread to the later states as in the
    sequential loop (IEEE arithmetic: 0 * nan = nan, so a zero coefficient does not stop a nan).
    For diagonal a the positions of nan and of inf match the loop's exactly (while products of
    coefficients stay finite). For dense a the positions of non-finite values match, but once a
    state holds inf, a matrix-vector product can turn it into nan in one order of operations and
    into +-inf in another, so which of the two appears may differ from the loop's.

    T = 0 returns an empty (..., 0, D) tensor.
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Tensor):
            raise TypeError(f"linear_scan: {name} must be a torch.Tensor; got {_describe(value)}")
    if x0 is not None and not isinstance(x0, Tensor):
        raise TypeError(f"linear_scan: x0 must be a torch.Tensor of shape (..., D) or None; "
                        f"got {_describe(x0)}")
    if not isinstance(reverse, bool):
        raise TypeError(f"linear_scan: reverse must be a bool; got {_describe(reverse)}")
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"linear_scan: unknown backend {backend!r}; valid: 'auto', "
                         + ", ".join(repr(k) for k in BACKENDS))
    if b.dim() < 2:
        raise ValueError(f"linear_scan: b must have shape (..., T, D) with at least 2 dims; got "
                         f"shape {tuple(b.shape)}")
    dtype = b.dtype
    if dtype not in _REAL + _COMPLEX + _LOW:
        raise TypeError(f"linear_scan: b has dtype {dtype}; expected a floating or complex dtype "
                        f"(float32, float64, bfloat16, float16, complex64, complex128)")
    for name, value in (("a", a), ("x0", x0)):
        if value is None:
            continue
        if value.dtype != dtype:
            raise TypeError(f"linear_scan: {name} has dtype {value.dtype} but b has {dtype}; "
                            f"convert them to one dtype (e.g. {name}.to(b.dtype))")
        if value.device != b.device:
            raise ValueError(f"linear_scan: {name} is on {value.device} but b is on {b.device}; "
                             f"move them to one device")
    dense = _resolve_structure(a, b, structure)
    T, D = b.shape[-2], b.shape[-1]
    if x0 is not None and (x0.dim() < 1 or x0.shape[-1] != D):
        raise ValueError(f"linear_scan: x0 must have shape (..., D) = (..., {D}) to match b of "
                         f"shape {tuple(b.shape)}; got {tuple(x0.shape)}")
    try:
        batch = batch_shape_of(a, b, x0, dense)
    except RuntimeError:
        shapes = f"a {tuple(a.shape)}, b {tuple(b.shape)}" + (
            f", x0 {tuple(x0.shape)}" if x0 is not None else "")
        raise ValueError(f"linear_scan: the leading (batch) dims of a, b and x0 must broadcast "
                         f"against each other; got {shapes}") from None
    if T == 0:  # empty, but on the inputs' graph: backward gives them zero gradients
        a_part = a[..., :0, :, :].sum(-1) if dense else a[..., :0, :]
        out = torch.zeros((*batch, 0, D), dtype=dtype, device=b.device) + a_part + b
        return out if x0 is None else out + x0.unsqueeze(-2)[..., :0, :]

    name = backend
    if name == "auto":
        name = choose_backend(T, D, batch.numel(), dense, dtype, b.device)
    if not BACKENDS[name].is_available(b.device):
        why = BACKENDS[name].missing or "it is not available on this machine"
        if BACKENDS[name].is_available() and name != "triton":  # installed, wrong device
            why = f"it does not run on {b.device.type} tensors"
        raise ValueError(f"linear_scan: backend={name!r} cannot run: {why}; or use "
                         f"backend='auto'")

    if dtype in _LOW:  # accumulate in float32
        a32, b32 = a.float(), b.float()
        x032 = None if x0 is None else x0.float()
        return _LinearScan.apply(a32, b32, x032, dense, reverse, name).to(dtype)
    return _LinearScan.apply(a, b, x0, dense, reverse, name)
