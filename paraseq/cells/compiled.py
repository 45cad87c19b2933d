"""Compiled sequential GRU loops for the CPU (numba), forward and reverse-time adjoint.

Shape letters: B batch, T time, H hidden size.

On a CPU a recurrence over small states is bound by per-step overhead, not arithmetic:
torch.nn.GRU spends some 15 microseconds of dispatch per step whatever the size, while the
arithmetic of a step at hidden 8, batch 16 is about 6 kFLOP (a few microseconds). A loop compiled
by numba runs at arithmetic speed, so it is the bar every parallel method must beat on a CPU.

``gru_sequence(gi, h0, weight_hh, bias_hh)`` runs h_t = GRU(gi_t, h_{t-1}) over all T steps,
from the input pre-activations gi = W_ih x + b_ih (B, T, 3 H) that a layer computes for all
steps in one matmul; weight_hh is (3 H, H) (torch.nn.GRU) or a (3 H,) vector (the diagonal-
recurrence GRU of ``paraseq.cells.functional.diag_gru``). Its backward is one compiled reverse
sweep (backpropagation through time, recomputing the gates from the stored states) that gives
the gradients for gi, h0, weight_hh and bias_hh. Parallel over the batch (numba prange).
Gate equations and order are torch's (r, z, n; the reset gate scales W_hn h + b_hn).

numba is optional: ``AVAILABLE`` says whether it imported. Kernels compile on first use and are
cached on disk (``cache=True``); the first call in a fresh process costs the compile (or the
cache load). float32 and float64; other dtypes are not served (``supported``). The backward is
not itself differentiable (double backward raises).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
from torch import Tensor

AVAILABLE = importlib.util.find_spec("numba") is not None
"""Whether numba is installed (it is imported, and the kernels compiled, on first use only)."""

__all__ = ["AVAILABLE", "gru_sequence", "supported"]

_KERNELS: dict = {}


def supported(x: Tensor) -> bool:
    """Whether the compiled loop serves this tensor (CPU, float32/float64, numba present)."""
    return AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


# A rational minimax approximation of tanh on [-7.9053, 7.9053] (odd degree-13 numerator,
# even degree-6 denominator; the coefficients Eigen uses for float): branch-free, so LLVM
# vectorises it across units, and within 3.6e-7 of tanh everywhere in float32 (tested). The
# float64 kernels use math.tanh / math.exp.
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
           5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
           -2.76076847742355e-16)
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
           1.19825839466702e-06)


def _fast_tanh(v):
    x = min(max(v, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = x * x
    p = x2 * _TANH_P[6] + _TANH_P[5]
    p = p * x2 + _TANH_P[4]
    p = p * x2 + _TANH_P[3]
    p = p * x2 + _TANH_P[2]
    p = p * x2 + _TANH_P[1]
    p = p * x2 + _TANH_P[0]
    q = x2 * _TANH_Q[3] + _TANH_Q[2]
    q = q * x2 + _TANH_Q[1]
    q = q * x2 + _TANH_Q[0]
    return x * p / q


def _sigmoid(v, fast):
    if fast:
        return 0.5 + 0.5 * _ftanh(0.5 * v)
    return 1.0 / (1.0 + math.exp(-v))


def _tanh(v, fast):
    return _ftanh(v) if fast else math.tanh(v)


_ftanh = _fast_tanh  # replaced by compiled forms in _build (the kernels call these names)
_sig = _sigmoid
_th = _tanh


def _recurrent(w, bh, hp, gh, diag, H):
    """gh = W_hh h + b_hh (dense (3H, H)) or w * [h, h, h] + b_hh (diagonal (3H, 1))."""
    K = gh.shape[0]
    if diag:
        for j in range(K):
            gh[j] = w[j, 0] * hp[j % H] + bh[j]
    else:
        for j in range(K):
            acc = bh[j]
            for k in range(H):
                acc += w[j, k] * hp[k]
            gh[j] = acc


_rec = _recurrent


def _gru_forward(gi, h0, w, bh, diag, fast, out):
    # gi (B, T, 3H), h0 (B, H), w (3H, H) or (3H, 1), bh (3H,), out (B, T, H)
    B, T, K = gi.shape
    H = K // 3
    for b in _prange(B):
        h = h0[b].copy()
        gh = np.empty(K, dtype=gi.dtype)
        for t in range(T):
            _rec(w, bh, h, gh, diag, H)
            for i in range(H):
                r = _sig(gi[b, t, i] + gh[i], fast)
                z = _sig(gi[b, t, H + i] + gh[H + i], fast)
                n = _th(gi[b, t, 2 * H + i] + r * gh[2 * H + i], fast)
                out[b, t, i] = n + z * (h[i] - n)
            for i in range(H):
                h[i] = out[b, t, i]


def _gru_backward(gi, h0, w, bh, diag, fast, out, g, dgi, dh0, dw, dbh):
    # g (B, T, H) = dL/dout; dgi like gi; dh0 like h0; dw (B, 3H, H) or (B, 3H, 1); dbh (B, 3H)
    B, T, K = gi.shape
    H = K // 3
    for b in _prange(B):
        dh = np.zeros(H, dtype=gi.dtype)  # dL/dh_t from the steps after t
        gh = np.empty(K, dtype=gi.dtype)
        dgh = np.empty(K, dtype=gi.dtype)
        for t in range(T - 1, -1, -1):
            hp = h0[b] if t == 0 else out[b, t - 1]
            _rec(w, bh, hp, gh, diag, H)
            for i in range(H):
                d = dh[i] + g[b, t, i]
                r = _sig(gi[b, t, i] + gh[i], fast)
                z = _sig(gi[b, t, H + i] + gh[H + i], fast)
                n = _th(gi[b, t, 2 * H + i] + r * gh[2 * H + i], fast)
                dpre_n = d * (1.0 - z) * (1.0 - n * n)
                dpre_z = d * (hp[i] - n) * z * (1.0 - z)
                dpre_r = dpre_n * gh[2 * H + i] * r * (1.0 - r)
                dgi[b, t, i] = dpre_r
                dgi[b, t, H + i] = dpre_z
                dgi[b, t, 2 * H + i] = dpre_n
                dgh[i] = dpre_r
                dgh[H + i] = dpre_z
                dgh[2 * H + i] = dpre_n * r
                dh[i] = d * z  # the direct path h_t = n + z (h_{t-1} - n)
            for j in range(K):
                dbh[b, j] += dgh[j]
            if diag:
                for j in range(K):
                    dw[b, j, 0] += dgh[j] * hp[j % H]
                    dh[j % H] += dgh[j] * w[j, 0]
            else:
                for j in range(K):
                    c = dgh[j]
                    for k in range(H):
                        dw[b, j, k] += c * hp[k]
                        dh[k] += c * w[j, k]
        for i in range(H):
            dh0[b, i] = dh[i]


_prange = range  # numba.prange once compiled


def _build() -> dict:
    """Imports numba and compiles (or loads from its on-disk cache) the kernels, once."""
    if _KERNELS:
        return _KERNELS
    if not AVAILABLE:
        raise RuntimeError("paraseq.cells.compiled needs numba: pip install numba")
    import numba

    g = globals()
    g["_prange"] = numba.prange
    g["_ftanh"] = numba.njit(cache=True, inline="always", fastmath=True)(_fast_tanh)
    g["_sig"] = numba.njit(cache=True, inline="always")(_sigmoid)
    g["_th"] = numba.njit(cache=True, inline="always")(_tanh)
    g["_rec"] = numba.njit(cache=True, inline="always", fastmath=True)(_recurrent)
    _KERNELS["fwd"] = numba.njit(cache=True, parallel=True)(_gru_forward)
    _KERNELS["bwd"] = numba.njit(cache=True, parallel=True)(_gru_backward)
    return _KERNELS


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
        B, T, K = gi.shape
        out = gi.new_empty(B, T, K // 3)  # (B, T, H)
        w = weight_hh.reshape(K, -1)  # (3H, H) or (3H, 1)
        _build()["fwd"](_np(gi), _np(h0), _np(w), _np(bias_hh), weight_hh.dim() == 1,
                        gi.dtype == torch.float32, out.numpy())
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        gi, h0, weight_hh, bias_hh = inputs
        ctx.save_for_backward(gi, h0, weight_hh, bias_hh, output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        gi, h0, weight_hh, bias_hh, out = ctx.saved_tensors
        B, K = gi.shape[0], gi.shape[2]
        w = weight_hh.reshape(K, -1)  # (3H, H) or (3H, 1)
        dgi = torch.empty_like(gi)  # (B, T, 3H)
        dh0 = torch.empty_like(h0)  # (B, H)
        dw = gi.new_zeros(B, *w.shape)  # per batch row, summed below (prange-safe)
        dbh = gi.new_zeros(B, K)
        _build()["bwd"](_np(gi), _np(h0), _np(w), _np(bias_hh), weight_hh.dim() == 1,
                        gi.dtype == torch.float32, _np(out), _np(g), dgi.numpy(), dh0.numpy(),
                        dw.numpy(), dbh.numpy())
        return dgi, dh0, dw.sum(0).reshape(weight_hh.shape), dbh.sum(0)


def gru_sequence(gi: Tensor, h0: Tensor, weight_hh: Tensor, bias_hh: Tensor | None) -> Tensor:
    """All T states of the GRU from gi (B, T, 3 H) and h0 (B, H): (B, T, H); differentiable in
    gi, h0, weight_hh ((3 H, H) or (3 H,)) and bias_hh ((3 H,) or None: zeros)."""
    if bias_hh is None:
        bias_hh = gi.new_zeros(gi.shape[-1])
    dtype = gi.dtype
    return _GRUSequence.apply(gi, h0.to(dtype), weight_hh.to(dtype), bias_hh.to(dtype))
