"""The chunked form as Triton kernels, forward and backward: ``form="triton"``.

Shape letters as in ``naive``; R = B H. Same arguments and results as ``naive.naive_attention``
(plus ``chunk_size``), and the same arithmetic as the pure-torch ``chunked`` form, its twin:
quadratic inside chunks of C steps, the (K, V) state carried from chunk to chunk. The kernels
(``_triton_kernels``) give one program to each (batch, head) row and block of value columns;
it holds the state in registers and walks the chunks in order, so the forward writes o and the
final state only, and the backward recomputes the chunk states in a second forward walk
(for dq) and carries the state's gradient in a reverse walk (for dk, dv and the initial
state's gradient): nothing of size T K V is stored, forward or backward, beyond
O(T (K + V)) for q, k, v and the gradients. The gradient of the log gate follows from dq and
dk (d log g_t = sum_(s >= t) (q_s dq_s - k_s dk_s), plus the final state's own term), a
reverse cumulative sum in torch.

What runs: the causal recurrence with no decay, a decay per (head and) step (RetNet,
Mamba-2), or a decay per key feature (GLA; chunks of 16 there, as its intra-chunk products
are formed feature by feature), an initial state, any T. Non-causal attention is two matmuls
(k^T v, then q S): the pure-torch chunked form runs it. Accumulation is in float32 for
float32, bfloat16 and float16 inputs, float64 for float64; ``tl.dot`` runs in IEEE precision
(no TF32), so the kernel holds the float32 tolerance of the other forms. K up to 256.

Where it runs: CUDA (or ROCm) tensors with triton installed; CPU tensors under triton's
interpreter (``TRITON_INTERPRET=1`` before triton is imported), slowly, for tests.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..scan import gpu as _scan_gpu

MAX_K = 256  # the feature block is the whole of K, held in registers
BLOCK_V = 32  # value columns per program: more programs for few (batch, head) rows
GLA_CHUNK = 16  # the chunk with a gate per key feature: (C, C, K) products per chunk
PRECISION = "ieee"  # tl.dot's input precision for float32

_module = None


def _kernels():
    global _module
    if _module is None:
        _module = importlib.import_module("._triton_kernels", __package__)
    return _module


def available(device: torch.device | None = None) -> bool:
    """Whether ``form="triton"`` can run on ``device``: triton installed, and a GPU, or the
    CPU under triton's interpreter (see ``paraseq.scan.gpu.triton_available``)."""
    return _scan_gpu.triton_available(device)


def why_not(device: torch.device) -> str:
    """Why ``form="triton"`` cannot run on ``device``, in words (for the error)."""
    if not _scan_gpu.AVAILABLE:
        return f"triton is not installed ({_scan_gpu.INSTALL_HINT})"
    if device.type == "cpu":
        return ("CPU tensors need triton's interpreter: set TRITON_INTERPRET=1 before triton "
                "is imported")
    return f"it does not run on {device}"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _chunk(chunk_size: int, gate: int, BK: int) -> int:
    """C: a power of two in [16, 64], 16 with a gate per key feature, at most 32 for K > 64
    (the (C, BK) tiles of q and k, and the (C, C) ones, stay within a program's registers)."""
    if gate == 2:
        return GLA_CHUNK
    return min(64 if BK <= 64 else 32, max(16, _pow2(chunk_size)))


def _warps(BK: int) -> int:
    return 8 if BK >= 128 else 4


class _TritonChunked(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None,
                initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
        B, H, T, K = q.shape
        V = v.shape[-1]
        R = B * H
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        gate = 0 if log_g is None else (1 if log_g.shape[-1] == 1 else 2)
        BK = max(16, _pow2(K))
        C = _chunk(chunk_size, gate, BK)
        BV = min(BLOCK_V, max(16, _pow2(V)))
        qr, kr = q.reshape(R, T, K).contiguous(), k.reshape(R, T, K).contiguous()  # (R, T, K)
        vr = v.reshape(R, T, V).contiguous()  # (R, T, V)
        g = None
        if gate:  # (R, T) one per step, or (R, T, K) one per key feature
            g = log_g.to(acc).expand(B, H, T, log_g.shape[-1]).reshape(R, T, -1)
            g = (g[..., 0] if gate == 1 else g).contiguous()
        S0 = None if initial_state is None else initial_state.reshape(R, K, V).contiguous()
        o = torch.empty(R, T, V, dtype=acc, device=q.device)  # (R, T, V)
        ST = torch.empty(R, K, V, dtype=acc, device=q.device)  # (R, K, V)
        grid = (R, -(-V // BV))
        _kernels()._fwd_kernel[grid](
            qr, kr, vr, qr if g is None else g, ST if S0 is None else S0, o, ST, T, K, V,
            GATE=gate, HAS_S0=S0 is not None, PREC=PRECISION, C=C, BK=BK, BV=BV,
            num_warps=_warps(BK))
        ctx.save_for_backward(qr, kr, vr, g, S0, ST)
        ctx.meta = (B, H, T, K, V, gate, C, BK, BV, log_g is not None and log_g.shape)
        ctx.set_materialize_grads(False)
        return o.reshape(B, H, T, V).to(q.dtype), ST.reshape(B, H, K, V).to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_o: Tensor | None, d_ST: Tensor | None):
        qr, kr, vr, g, S0, ST = ctx.saved_tensors
        B, H, T, K, V, gate, C, BK, BV, g_shape = ctx.meta
        R, acc, dev = B * H, ST.dtype, qr.device
        NV = -(-V // BV)
        d_o = (torch.zeros(R, T, V, dtype=acc, device=dev) if d_o is None
               else d_o.reshape(R, T, V).contiguous())  # (R, T, V)
        dST = None if d_ST is None else d_ST.reshape(R, K, V).contiguous()  # (R, K, V)
        dq = torch.empty(NV, R, T, K, dtype=acc, device=dev)  # per value block
        dk = torch.empty(NV, R, T, K, dtype=acc, device=dev)  # per value block
        dv = torch.empty(R, T, V, dtype=acc, device=dev)
        dS0 = torch.empty(R, K, V, dtype=acc, device=dev)
        kern = _kernels()
        gp = qr if g is None else g
        meta = dict(GATE=gate, PREC=PRECISION, C=C, BK=BK, BV=BV, num_warps=_warps(BK))
        kern._dq_kernel[(R, NV)](qr, kr, vr, gp, ST if S0 is None else S0, d_o, dq, T, K, V,
                                 R, HAS_S0=S0 is not None, **meta)
        kern._dkv_kernel[(R, NV)](qr, kr, vr, gp, d_o, ST if dST is None else dST, dk, dv, dS0,
                                  T, K, V, R, HAS_DST=dST is not None, **meta)
        dq, dk = dq.sum(0), dk.sum(0)  # (R, T, K)
        d_log_g = None
        if gate and ctx.needs_input_grad[3]:
            # log g_t enters every cumulative log gate from t on: the reverse cumulative sum
            # of d Gamma_s = q_s dq_s - k_s dk_s, plus the final state's exp(Gamma_T) term
            dG = qr.to(acc) * dq - kr.to(acc) * dk  # (R, T, K)
            last = 0 if dST is None else (ST * dST.to(acc)).sum(-1)  # (R, K)
            if gate == 1:
                dG = dG.sum(-1, keepdim=True)  # (R, T, 1)
                last = last if dST is None else last.sum(-1, keepdim=True)  # (R, 1)
            d_log_g = dG.flip(1).cumsum(1).flip(1)
            if dST is not None:
                d_log_g = d_log_g + last[:, None, :]
            d_log_g = d_log_g.reshape(B, H, T, -1).sum_to_size(g_shape)
        dtype = qr.dtype
        return (dq.reshape(B, H, T, K).to(dtype), dk.reshape(B, H, T, K).to(dtype),
                dv.reshape(B, H, T, V).to(dtype),
                None if d_log_g is None else d_log_g.to(dtype),
                None if S0 is None else dS0.reshape(B, H, K, V).to(S0.dtype), None)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor | None = None,
                     initial_state: Tensor | None = None, causal: bool = True,
                     chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same arguments and results as ``naive.naive_attention``, plus ``chunk_size`` (rounded
    up to a power of two in [16, 64]; 32 at most for K > 64; 16 with a gate per key
    feature)."""
    if not available(q.device):
        raise ValueError(f"linear_attention: form='triton' cannot run here: {why_not(q.device)};"
                         f" or use form='auto' or form='chunked' (the same arithmetic in torch)")
    T, K = q.shape[-2:]
    if K > MAX_K:
        raise ValueError(f"linear_attention: form='triton' takes a feature size K <= {MAX_K};"
                         f" got {K}; use form='chunked'")
    if not causal or T == 0:
        from .chunked import chunked_attention
        return chunked_attention(q, k, v, log_g, initial_state, causal, chunk_size)
    if q.dtype not in (torch.float32, torch.float64):
        out = triton_attention(q.float(), k.float(), v.float(),
                               None if log_g is None else log_g.float(),
                               None if initial_state is None else initial_state.float(), True,
                               chunk_size)
        return out[0].to(q.dtype), out[1].to(q.dtype)
    return _TritonChunked.apply(q, k, v, log_g, initial_state, chunk_size)
