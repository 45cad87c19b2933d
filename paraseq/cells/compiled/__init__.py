"""Compiled sequential loops for the built-in cells on the CPU (numba), forward and the
reverse-time adjoint.

Shape letters: B batch, T time, H hidden size, P the size of h (proj_size for a projected
LSTM, else H), K = G H the gate pre-activations (G gates: Elman 1, GRU 3, LSTM 4), W the SIMD
width (16 float32 or 8 float64: one 64-byte vector).

On a CPU a recurrence over small states is bound by per-step overhead, not arithmetic:
torch.nn.GRU spends some 15 microseconds of dispatch per step whatever the size, while a step at
hidden 8, batch 16 is about 6 kFLOP. A compiled loop runs at arithmetic speed, so it is the bar
every parallel method must beat on a CPU.

The loops, each a ``torch.autograd.Function`` whose backward is one compiled reverse sweep
(backpropagation through time, recomputing the gates from the stored states) giving the
gradients of every input, from the input pre-activations gi = W_ih x + b_ih (B, T, K) that a
layer computes for all steps in one matmul:

    gru_sequence(gi, h0, weight_hh, bias_hh) -> h (B, T, H)
        torch's GRU (gates r, z, n; the reset gate scales W_hn h + b_hn)
    elman_sequence(gi, h0, weight_hh, bias_hh, nonlinearity="tanh") -> h (B, T, H)
        h_t = act(gi_t + W_hh h_{t-1} + b_hh), act tanh or relu (torch.nn.RNN)
    lstm_sequence(gi, h0, c0, weight_hh, bias_hh, weight_hr=None) -> (h (B, T, P), c (B, T, H))
        torch's LSTM (gates i, f, g, o; c = f c + i g, h = o tanh(c)); with weight_hr (P, H),
        h = W_hr (o tanh(c)) (proj_size)

weight_hh is torch's (K, P), or a (K,) vector for the diagonal-recurrence cells of
``paraseq.cells.functional`` (diag_gru, diag_lstm: W_hk h replaced by w_hk * h); bias_hh is
(K,) or None. The results equal the cell loops of ``paraseq.cells.functional`` (tested to 1e-10
in float64, ~1e-6 in float32). float32 and float64 CPU tensors only (``supported``); the
backward is not itself differentiable (double backward raises).

Two kernels, both explicit SIMD (a small numba extension, ``simd``, gives LLVM vectors, because
LLVM's auto-vectoriser left these short loops scalar):

- "lanes": a vector holds W batch rows of one unit; all rows advance in lockstep, one step at a
  time, so a step is a few vector instructions per unit and the dependency chain of one step
  (two transcendentals) is paid once for W rows. The recurrent product is K P vector FMAs per
  W rows. Best for small H, and at any H once B fills the vectors.
- "rows": a vector holds W units of one batch row (the product W_hh h as P vector FMAs per W
  gate units). Best for few rows and a wide state: it wastes no lanes at B = 1. The rows
  advance together, one step at a time, so that one pass over the weights serves all of them
  (tiles of four rows by four vectors, ``tiles._mv``): forward, the reverse sweep's W_hh^T dy,
  and W_hh's gradient, one product per block of steps. With a gradient to take, the forward
  keeps W_hh h + b_hh of every step (``_SAVE_GATES_MIN_P``) for the reverse sweep.

``_plan`` picks one by the measured rule in its docstring. gi may have any strides (and is
never copied): the lanes kernel reads it fastest with the batch contiguous, memory (K, T, B),
which ``input_projection`` gives a layer at small H; the rows kernel with the gates contiguous,
torch's (T, B, K). The outputs come back as (B, T, .) views of memory laid out for the kernel,
(H, T, B) (lanes) or (T, B, H) (rows). Large problems split the batch across
``torch.get_num_threads()`` threads (the kernels release the GIL); see ``_plan``.

Measured (2-core AMD EPYC shared with other jobs, so CPU time of one thread, float32, GRU
forward including the input projection, against torch.nn.GRU in the same run;
``benchmarks/compiled.py``): hidden 1, batch 16, T = 1e5: 7.3 ms, 173x (JAX's jitted lax.scan:
6.3 ms); hidden 8, batch 16, T = 1e4: 8.8 ms, 17x (JAX: 39 ms); hidden 32, batch 16, T = 1e4:
60 to 70 ms, 3.5x (JAX: 93 ms). Where each loop beats torch's own kernel (forward, T = 1e3):
the GRU up to B H ~ 16384, the tanh RNN up to B H ~ 8192 (training: 4096), and the LSTM,
whose CPU kernel (oneDNN) is far quicker than torch's GRU, for H <= 8 at any B (training:
B <= 16) and at B = 1 up to H = 128 (training: 32).

numba is optional: ``AVAILABLE`` says whether it is installed; it is imported, and the kernels
compiled, on first use, then cached on disk (``cache=True``): the first call of a kernel (lanes
or rows, forward or backward, per dtype) costs its compile, 1.5 to 3 s of CPU here (all eight:
about 20 s), and in a later process the cache load (about 1 s for the first).

float32 uses a branch-free rational tanh (``_fast_tanh``, within 3.6e-7 of tanh) and
sigmoid(v) = (1 + tanh(v / 2)) / 2 through it; float64 computes tanh and sigmoid from a
vectorised expm1 (``_expm1_64``).

The package, top down:

    __init__   the public loops (autograd Functions over the kernels), ``input_projection``,
               ``_build`` (compiles the kernels once per process)
    plan       which kernel and how many threads (``_plan``), the threads (``_run_split``)
    buffers    tensors to kernel arguments: flat views, output layouts, weight layouts
    lanes      the lanes kernels: forward loop, adjoint, Newton sweep (every cell kind)
    rows       the rows kernels: the same three
    tiles      the rows kernels' batched products (register tiles, inlined)
    diag       the Newton sweep of the diagonal-recurrence cells (elementwise, either layout)
    cellmath   each cell family's step, adjoint and Newton unit on vectors (GRU, Elman, LSTM)
    simd       the numba extension (the vector type and its intrinsics), tanh, sigmoid, expm1

numba's on-disk cache keys a compiled function on a hash of its own source file, while a kernel
inlines code from ``cellmath`` and ``simd``: ``_build`` stamps every cached function with a hash
of all the kernel files, so a change in any of them recompiles every kernel (a stale kernel
would otherwise go on running the old helpers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import cellmath, diag, lanes, rows, simd, tiles
from .buffers import _alloc, _alloc_like, _empty_like_layout, _flat, _pad, _vec, _Weights
from .cellmath import _ELMAN_RELU, _ELMAN_TANH, _GRU, _LSTM, _NGATES
from .plan import _plan, _run_split, _width
from .simd import _fast_tanh

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (it is imported, and the kernels compiled, on first use only)."""

__all__ = ["AVAILABLE", "elman_sequence", "gru_sequence", "input_projection", "lstm_sequence",
           "supported"]

# names the kernels' code uses, re-exported for paraseq.cells.newton, paraseq.nn, the tests
# and the benchmarks, which reach them as ``compiled.<name>``
_REEXPORTED = (_ELMAN_RELU, _ELMAN_TANH, _GRU, _LSTM, _alloc, _alloc_like, _fast_tanh, _pad,
               _width)

_KERNELS: dict = {}
_BUILD_LOCK = threading.Lock()


def supported(x: Tensor) -> bool:
    """Whether the compiled loops serve this tensor (CPU, float32/float64, numba present)."""
    return AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- the build

_VEC_HELPERS = {simd: ("_tanh_from_expm1",),
                cellmath: ("_gru_f", "_gru_b", "_elman_f", "_elman_b", "_lstm_f", "_lstm_b",
                           "_res", "_gru_newton", "_elman_newton", "_lstm_newton",
                           "_lstm_quasi"),
                tiles: ("_mv",)}
_ENTRY = {lanes: ("_lanes_fwd", "_lanes_bwd", "_lanes_newton", "_lanes_proj1"),
          rows: ("_rows_fwd", "_rows_bwd", "_rows_newton"),
          diag: ("_diag_newton",)}
_KERNEL_MODULES = (simd, cellmath, tiles, lanes, rows, diag)


def _source_stamp() -> bytes:
    """A hash of every file whose code the kernels compile."""
    h = hashlib.sha256()
    for m in _KERNEL_MODULES:
        h.update(Path(m.__file__).read_bytes())
    return h.digest()


def _stamp(dispatcher, stamp: bytes) -> None:
    """Keys numba's on-disk cache of one function on ``stamp`` instead of its own file's hash
    (numba's private attributes; left as numba made it where they are missing:
    tests/test_layout.py checks that the stamp took)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = stamp


def _build() -> dict:
    """Imports numba, defines the SIMD extension and compiles (or loads from numba's on-disk
    cache) the kernels, once per process."""
    if _KERNELS:
        return _KERNELS
    if not AVAILABLE:
        raise RuntimeError("paraseq.cells.compiled needs numba: pip install numba")
    with _BUILD_LOCK:
        if _KERNELS:
            return _KERNELS
        import numba

        simd._define_simd(numba)
        stamp = _source_stamp()
        linked = {name: getattr(simd, name) for name in simd._LINKED}
        for mod, names in _VEC_HELPERS.items():
            for name in names:
                inline = "always" if name in getattr(mod, "_INLINE", ()) else "never"
                linked[name] = numba.njit(cache=True, inline=inline)(getattr(mod, name))
                _stamp(linked[name], stamp)
        # the kernel modules imported the stubs: bind the intrinsics and compiled helpers
        # wherever a module names them (numba resolves a function's globals when it compiles)
        for mod in _KERNEL_MODULES:
            for name, obj in linked.items():
                if name in vars(mod):
                    setattr(mod, name, obj)
        kernels = {}
        for mod, names in _ENTRY.items():
            for name in names:
                kernels[name] = numba.njit(cache=True, nogil=True,
                                           error_model="numpy")(getattr(mod, name))
                _stamp(kernels[name], stamp)
        _KERNELS.update(kernels)
    return _KERNELS


# ----------------------------------------------------------------------------- the loops


_SAVE_GATES_MIN_P = 32
"""The rows kernel keeps W_hh h_{t-1} + b_hh of every step for the reverse sweep (memory
B T G Hp, about gi's size) when a gradient will be taken and the state has at least this many
units; the sweep otherwise recomputes it, a third of its multiply-adds. Below, the product is
cheap and the padded buffer large against gi (H = 1: 16 floats a gate per step)."""


def _forward(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
             bias_hh: Tensor, weight_hr: Tensor | None, save: bool = False):
    """Runs the forward kernel: h (B, T, P) and, for the LSTM, c (B, T, H), the kernel's name
    and, where ``save`` asks for it and the rows kernel keeps them (``_SAVE_GATES_MIN_P``),
    W_hh h_{t-1} + b_hh of every step for ``_backward`` (else None)."""
    B, T, K = gi.shape
    NQ = _NGATES[cell]
    H = K // NQ
    P = h0.shape[-1]
    if B * T == 0:
        return (gi.new_zeros(B, T, P), (gi.new_zeros(B, T, H) if cell == _LSTM else None), "-",
                None)
    kernel, nt = _plan(B, T, H, P, K, gi.dtype)
    lanes = kernel == "lanes"
    W = _width(gi.dtype)
    vw = (0,) * W
    lstm = cell == _LSTM
    wts = _Weights(cell, weight_hh, bias_hh, weight_hr, H, P, lanes, W)
    oh = _empty_like_layout(B, T, P, lanes, gi)
    oc = _empty_like_layout(B, T, H, lanes, gi) if lstm else None
    gif, gs = _flat(gi)
    ohf, ohs = _flat(oh)
    ocf, ocs = _flat(oc) if lstm else (wts.empty, (0, 0, 0))
    h0f = _vec(h0)
    c0f = _vec(c0) if lstm else wts.empty
    k = _build()
    ghb = None
    if not lanes and save and not wts.diag and P >= _SAVE_GATES_MIN_P:
        ghb = _alloc((T, B, NQ * wts.Hp), gi.dtype)
    ghf = ghb.view(-1).numpy() if ghb is not None else wts.empty
    if lanes:
        def part(lo, hi):
            k["_lanes_fwd"](cell, gif, gs, h0f, c0f, wts.w, wts.wd, wts.bh, wts.diag, wts.whr,
                            ohf, ohs, ocf, ocs, T, H, P, lo, hi, vw)
    else:
        def part(lo, hi):
            k["_rows_fwd"](cell, gif, gs, h0f, c0f, wts.wT, wts.wd, wts.bh, wts.diag, wts.whrT,
                           ohf, ohs, ocf, ocs, ghf, T, H, P, lo, hi, vw)
    _run_split(part, B, W, nt, lanes)
    return oh, oc, kernel, ghb


def _backward(cell: int, gi: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
              bias_hh: Tensor, weight_hr: Tensor | None, oh: Tensor, oc: Tensor | None,
              g_h: Tensor | None, g_c: Tensor | None, kernel: str, ghb: Tensor | None = None):
    """The adjoint sweep: (dgi, dh0, dc0, dweight_hh, dbias_hh, dweight_hr); ghb: what
    ``_forward`` kept, or None."""
    B, T, K = gi.shape
    NQ = _NGATES[cell]
    H = K // NQ
    P = h0.shape[-1]
    proj = weight_hr is not None
    if B * T == 0:
        return (torch.zeros_like(gi), torch.zeros_like(h0),
                None if c0 is None else torch.zeros_like(c0), torch.zeros_like(weight_hh),
                torch.zeros_like(bias_hh), None if not proj else torch.zeros_like(weight_hr))
    lanes = kernel == "lanes"
    _, nt = _plan(B, T, H, P, K, gi.dtype)
    W = _width(gi.dtype)
    vw = (0,) * W
    lstm = cell == _LSTM
    wts = _Weights(cell, weight_hh, bias_hh, weight_hr, H, P, lanes, W)
    if g_h is None:
        g_h = gi.new_zeros(1, 1, 1).expand(B, T, P)
    if lstm and g_c is None:
        g_c = gi.new_zeros(1, 1, 1).expand(B, T, H)
    dgi = _alloc_like(gi)  # the layout of gi
    dh0 = gi.new_empty(B, P)
    dc0 = gi.new_empty(B, H) if lstm else None
    gif, gs = _flat(gi)
    ohf, ohs = _flat(oh)
    ocf, ocs = _flat(oc) if lstm else (wts.empty, (0, 0, 0))
    ghf, ghs = _flat(g_h)
    gcf, gcs = _flat(g_c) if lstm else (wts.empty, (0, 0, 0))
    dgif, dgs = _flat(dgi)
    h0f = _vec(h0)
    c0f = _vec(c0) if lstm else wts.empty
    dh0f = dh0.numpy().reshape(-1)
    dc0f = dc0.numpy().reshape(-1) if lstm else wts.empty
    k = _build()
    diag = wts.diag

    # the weight gradients in NumPy, on the calling thread (see ``buffers._npad``)
    dtype = wts.empty.dtype
    if lanes:
        def part(lo, hi):
            dw = np.zeros(0 if diag else K * P * W, dtype=dtype)
            dwd = np.zeros(K * W if diag else 0, dtype=dtype)
            dbh = np.zeros(K * W, dtype=dtype)
            dwhr = np.zeros(P * H * W if proj else 0, dtype=dtype)
            k["_lanes_bwd"](cell, gif, gs, h0f, c0f, wts.w, wts.wd, wts.bh, diag, wts.whr, ohf,
                            ohs, ocf, ocs, ghf, ghs, gcf, gcs, dgif, dgs, dh0f, dc0f, dw, dwd, dbh,
                            dwhr, T, H, P, lo, hi, vw)
            dwh = dwd.reshape(K, W).sum(1) if diag else dw.reshape(K, P, W).sum(2)
            return (dwh, dbh.reshape(K, W).sum(1),
                    dwhr.reshape(P, H, W).sum(2) if proj else None)
    else:
        Hp, Pp = wts.Hp, wts.Pp
        gsf = wts.empty if ghb is None else ghb.view(-1).numpy()

        def part(lo, hi):
            dw = np.zeros(0 if diag else K * Pp, dtype=dtype)
            dwd = np.zeros(NQ * Hp if diag else 0, dtype=dtype)
            dbh = np.zeros(NQ * Hp, dtype=dtype)
            dwhr = np.zeros(P * Hp if proj else 0, dtype=dtype)
            k["_rows_bwd"](cell, gif, gs, h0f, c0f, wts.wT, wts.wd, wts.bh, diag, wts.whrT,
                           ohf, ohs, ocf, ocs, ghf, ghs, gcf, gcs, dgif, dgs, dh0f, dc0f, wts.wR,
                           wts.whr, dw, dwd, dbh, dwhr, gsf, T, H, P, lo, hi, vw)
            dwh = (dwd.reshape(NQ, Hp)[:, :H].reshape(K) if diag
                   else dw.reshape(K, Pp)[:, :P])
            return (dwh, dbh.reshape(NQ, Hp)[:, :H].reshape(K),
                    dwhr.reshape(P, Hp)[:, :H] if proj else None)
    parts = _run_split(part, B, W, nt, lanes)

    def total(i):
        s = parts[0][i]
        for p in parts[1:]:
            s = s + p[i]
        # a torch-owned copy: autograd hands weight gradients to the parameters' .grad, and
        # FSDP frees storage by resizing it, which a tensor that shares memory with NumPy
        # (torch.from_numpy, or any tensor whose .numpy() was taken) refuses
        return torch.from_numpy(np.ascontiguousarray(s)).clone()

    dwh = total(0)
    dbh = total(1)
    dwhr = total(2) if proj else None
    return dgi, dh0, dc0, dwh.reshape(weight_hh.shape), dbh, dwhr


# ----------------------------------------------------------------------------- autograd


class _Sequence(torch.autograd.Function):
    """The compiled loop of one cell as a Function of (gi, h0, c0, weight_hh, bias_hh,
    weight_hr); c0 and weight_hr are None where the cell has none. ``grad``: whether grad mode
    was on at the call (inside forward it is off; ``needs_input_grad`` follows requires_grad
    alone, so parameters under no_grad read True), to keep what the backward needs only when
    one can follow."""

    @staticmethod
    def forward(ctx, cell, grad, gi, h0, c0, weight_hh, bias_hh, weight_hr):
        oh, oc, kernel, ghb = _forward(cell, gi, h0, c0, weight_hh, bias_hh, weight_hr,
                                       save=grad and any(ctx.needs_input_grad))
        ctx.cell, ctx.kernel, ctx.ghb = cell, kernel, ghb
        ctx.save_for_backward(gi, h0, c0, weight_hh, bias_hh, weight_hr, oh, oc)
        if cell == _LSTM:
            return oh, oc
        return oh

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_h, g_c=None):
        gi, h0, c0, weight_hh, bias_hh, weight_hr, oh, oc = ctx.saved_tensors
        dgi, dh0, dc0, dwh, dbh, dwhr = _backward(ctx.cell, gi, h0, c0, weight_hh, bias_hh,
                                                  weight_hr, oh, oc, g_h, g_c, ctx.kernel,
                                                  ctx.ghb)
        return None, None, dgi, dh0, dc0, dwh, dbh, dwhr


def _check(fn: str, gi: Tensor, states: tuple[tuple[str, Tensor, int], ...], weight_hh: Tensor,
           bias_hh: Tensor | None, NQ: int, P: int, weight_hr: Tensor | None = None) -> None:
    if not isinstance(gi, Tensor) or gi.dim() != 3:
        raise ValueError(f"{fn}: gi must be a (B, T, {NQ} H) tensor; got "
                         f"{tuple(gi.shape) if isinstance(gi, Tensor) else type(gi).__name__}")
    if not supported(gi):
        raise ValueError(f"{fn}: the compiled loops take float32/float64 CPU tensors with numba "
                         f"installed; got {gi.dtype} on {gi.device} (numba installed: "
                         f"{AVAILABLE})")
    B, _, K = gi.shape
    if K % NQ:
        raise ValueError(f"{fn}: gi.shape[-1] must be {NQ} H; got {K}")
    H = K // NQ
    for name, s, size in states:
        if not isinstance(s, Tensor) or tuple(s.shape) != (B, size):
            raise ValueError(f"{fn}: {name} must have shape (B, {size}) = ({B}, {size}); got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
    if tuple(weight_hh.shape) not in ((K, P), (K,)) or (weight_hh.dim() == 1 and P != H):
        raise ValueError(f"{fn}: weight_hh must have shape ({K}, {P}) (or ({K},), diagonal "
                         f"recurrence); got {tuple(weight_hh.shape)}")
    if bias_hh is not None and tuple(bias_hh.shape) != (K,):
        raise ValueError(f"{fn}: bias_hh must have shape ({K},) or be None; got "
                         f"{tuple(bias_hh.shape)}")
    if weight_hr is not None and tuple(weight_hr.shape) != (P, H):
        raise ValueError(f"{fn}: weight_hr must have shape (P, H) = ({P}, {H}); got "
                         f"{tuple(weight_hr.shape)}")


def _prep(gi, t):
    return None if t is None else t.to(gi.dtype)


def gru_sequence(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Tensor:
    """All T states of the GRU from gi (B, T, 3 H) and h0 (B, H): (B, T, H); differentiable in
    gi, h0, weight_hh ((3 H, H), or (3 H,): diagonal recurrence) and bias_hh ((3 H,) or None:
    zeros)."""
    H = gi.shape[-1] // 3
    _check("gru_sequence", gi, (("h0", h0, H),), weight_hh, bias_hh, 3, H)
    if bias_hh is None:
        bias_hh = gi.new_zeros(gi.shape[-1])
    return _Sequence.apply(_GRU, torch.is_grad_enabled(), gi, _prep(gi, h0), None,
                           _prep(gi, weight_hh), _prep(gi, bias_hh), None)


def elman_sequence(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                   nonlinearity: str = "tanh") -> Tensor:
    """All T states of the Elman RNN h_t = act(gi_t + W_hh h_{t-1} + b_hh) from gi (B, T, H)
    and h0 (B, H): (B, T, H); act "tanh" or "relu" (torch.nn.RNN); weight_hh (H, H) or (H,)
    (diagonal recurrence); bias_hh (H,) or None."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"elman_sequence: nonlinearity must be 'tanh' or 'relu'; got "
                         f"{nonlinearity!r}")
    H = gi.shape[-1]
    _check("elman_sequence", gi, (("h0", h0, H),), weight_hh, bias_hh, 1, H)
    if bias_hh is None:
        bias_hh = gi.new_zeros(H)
    cell = _ELMAN_TANH if nonlinearity == "tanh" else _ELMAN_RELU
    return _Sequence.apply(cell, torch.is_grad_enabled(), gi, _prep(gi, h0), None,
                           _prep(gi, weight_hh), _prep(gi, bias_hh), None)


def lstm_sequence(gi: Tensor, h0: Tensor, c0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None,
                  weight_hr: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """All T states of the LSTM from gi (B, T, 4 H), h0 (B, P) and c0 (B, H): (h (B, T, P),
    c (B, T, H)), P = H, or proj_size with weight_hr (P, H) (h = W_hr (o tanh(c))); weight_hh
    (4 H, P), or (4 H,) (diagonal recurrence, no projection); bias_hh (4 H,) or None.
    Differentiable in every tensor argument."""
    H = gi.shape[-1] // 4
    P = H if weight_hr is None else weight_hr.shape[0]
    _check("lstm_sequence", gi, (("h0", h0, P), ("c0", c0, H)), weight_hh, bias_hh, 4, P,
           weight_hr)
    if bias_hh is None:
        bias_hh = gi.new_zeros(gi.shape[-1])
    return _Sequence.apply(_LSTM, torch.is_grad_enabled(), gi, _prep(gi, h0), _prep(gi, c0),
                           _prep(gi, weight_hh), _prep(gi, bias_hh), _prep(gi, weight_hr))




class _Projection(torch.autograd.Function):
    """x (T, B, n) -> W x^T + b as (K, T B) (lanes: batch contiguous) or x W^T + b as
    (T B, K), into a buffer with huge pages (``_alloc``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lanes):
        T, B, n = x.shape
        N = T * B
        K = weight.shape[0]
        if lanes and n == 1:  # an outer product and its bias, one pass reading x in place
            gi = _alloc((K, N), x.dtype)
            xf, (st, sb, _) = _flat(x)
            _build()["_lanes_proj1"](xf, (sb, st), _vec(weight),
                                     _vec(bias) if bias is not None else _vec(weight)[:0],
                                     gi.view(-1).numpy(), T, B, (0,) * _width(x.dtype))
            ctx.save_for_backward(x, weight)
            ctx.lanes, ctx.bias = lanes, bias is not None
            return gi
        x2 = x.reshape(N, n)
        if lanes:
            gi = _alloc((K, N), x2.dtype)
            torch.mm(weight, x2.t(), out=gi)
            if bias is not None:
                gi.add_(bias.unsqueeze(1))  # addmm's broadcast bias would cost a pass more
        else:
            gi = _alloc((N, K), x2.dtype)
            if bias is None:
                torch.mm(x2, weight.t(), out=gi)
            else:
                torch.addmm(bias, x2, weight.t(), out=gi)
        ctx.save_for_backward(x, weight)
        ctx.lanes, ctx.bias = lanes, bias is not None
        return gi

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        T, B, n = x.shape
        gNK = g.t() if ctx.lanes else g  # (N, K)
        dx = (gNK @ weight).view(T, B, n) if ctx.needs_input_grad[0] else None
        dw = gNK.t() @ x.reshape(T * B, n) if ctx.needs_input_grad[1] else None
        db = gNK.sum(0) if ctx.bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


_LANES_LAYOUT_MAX_H = 4
"""``input_projection`` lays gi out batch-contiguous, (K, T, B), only up to this hidden size:
there the lanes kernel is bound by the latency of a step and its W-lane vector loads save
~20% (GRU, B = 16: H = 1, T = 1e5: projection + kernel 10.2 ms against 16.5 ms reading
torch's (T, B, K) layout lane by lane; H = 4: 7.1 against 9.1 ms). From H = 8 on the matmul
in torch's orientation, whose bias comes free, costs less than the transposed one plus a bias
pass (H = 32: 44 against 51 ms) and the kernel, bound by arithmetic, reads either layout at
the same speed."""


def input_projection(x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None,
                     hidden_size: int) -> Tensor:
    """gi = W_ih x + b_ih for all steps of x (T, B, n): (B, T, K), laid out for the kernel the
    compiled loops will pick for this batch and hidden size: memory (K, T, B) (the batch
    contiguous) for the lanes kernel at small H (``_LANES_LAYOUT_MAX_H``), torch's (T, B, K)
    otherwise; F.linear's values and gradients, into a buffer with huge pages (``_alloc``)."""
    T, B, _ = x.shape
    K = weight_ih.shape[0]
    if not supported(x) or weight_ih.dtype != x.dtype:
        return torch.nn.functional.linear(x, weight_ih, bias_ih).transpose(0, 1)
    lanes = (hidden_size <= _LANES_LAYOUT_MAX_H
             and _plan(B, T, hidden_size, hidden_size, K, x.dtype)[0] == "lanes")
    gi = _Projection.apply(x, weight_ih, bias_ih, lanes)
    if lanes:
        return gi.view(K, T, B).permute(2, 1, 0)
    return gi.view(T, B, K).transpose(0, 1)
