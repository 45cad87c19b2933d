"""Tensors to kernel arguments and back: flat NumPy views, output buffers laid out as the kernel
writes fastest, and the recurrent weights in each kernel's layout."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .cellmath import _NGATES


def _flat(t: Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A 1-D NumPy view over the memory a (B, T, X) tensor spans, and its strides."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
    return t.detach().as_strided((span,), (1,)).numpy(), tuple(t.stride())


def _vec(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).numpy()


def _alloc(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.empty, with transparent huge pages asked for on large buffers (the first write
    into fresh memory faults every 4 KiB page in: at hidden 32, batch 16, T = 1e4 the input
    projection took 64 ms with torch's allocation, 31 ms into huge pages; see
    ``paraseq.scan.compiled._empty``)."""
    from ...scan.compiled import _empty

    return _empty(shape, dtype)


def _empty_like_layout(B: int, T: int, X: int, lanes: bool, like: Tensor) -> Tensor:
    """A (B, T, X) tensor laid out as the kernel writes fastest: (X, T, B) or (T, B, X)."""
    if lanes:
        return _alloc((X, T, B), like.dtype).permute(2, 1, 0)
    return _alloc((T, B, X), like.dtype).transpose(0, 1)


def _alloc_like(t: Tensor) -> Tensor:
    """An uninitialised tensor with t's shape and the order of its strides (dense)."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    out = _alloc(tuple(t.shape[d] for d in order), t.dtype)
    return out.permute(*sorted(range(t.dim()), key=lambda d: order[d]))


def _pad(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _npad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``_pad`` in NumPy, flattened: the kernels' weight layouts are built with NumPy, whose
    small copies run on the calling thread (torch's would start its thread pool on these
    K P-float arrays, which costs a time slice whenever another process holds a core)."""
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out.reshape(-1)


class _Weights:
    """The recurrent weights of one call in the layouts of the chosen kernel."""

    def __init__(self, cell: int, weight_hh: Tensor, bias_hh: Tensor, weight_hr: Tensor | None,
                 H: int, P: int, lanes: bool, W: int):
        NQ = _NGATES[cell]
        self.diag = weight_hh.dim() == 1
        dt = weight_hh.dtype
        empty = np.zeros(0, dtype=np.float32 if dt == torch.float32 else np.float64)
        # copies: taking .numpy() of a tensor makes its storage non-resizable, and FSDP frees
        # an unsharded parameter by resizing its storage to zero
        wh = weight_hh.detach().clone()
        bh = bias_hh.detach().clone()
        whr = None if weight_hr is None else weight_hr.detach().clone()
        wn, bn = wh.numpy(), bh.numpy()
        whrn = None if whr is None else whr.numpy()
        self.empty = empty
        if lanes:
            self.w = empty if self.diag else _vec(wh)  # (K, P)
            self.wd = _vec(wh) if self.diag else empty  # (K,)
            self.bh = _vec(bh)
            self.whr = empty if whr is None else _vec(whr)  # (P, H)
            return
        Hp, Pp = -(-H // W) * W, -(-P // W) * W
        self.Hp, self.Pp = Hp, Pp
        if self.diag:
            self.wT = self.wR = empty
            self.wd = _npad(wn.reshape(NQ, H), (NQ, Hp))
        else:
            self.wT = _npad(wn.reshape(NQ, H, P).transpose(2, 0, 1), (P, NQ, Hp))  # (P, NQ Hp)
            self.wR = _npad(wn, (NQ * H, Pp))  # (K, Pp)
            self.wd = empty
        self.bh = _npad(bn.reshape(NQ, H), (NQ, Hp))
        self.whrT = empty if whr is None else _npad(whrn.T, (H, Pp))  # (H, Pp)
        self.whr = empty if whr is None else _npad(whrn, (P, Hp))  # (P, Hp)
