"""Independent references for the tests: plain loops, in float64 or complex128 NumPy or in
differentiable torch, written without any of paraseq's code."""

from __future__ import annotations

import numpy as np
import torch


def scan_numpy(a, b, x0=None, *, dense: bool, reverse: bool = False) -> np.ndarray:
    """x_t = a_t x_{t-1} + b_t in float64/complex128 NumPy, broadcasting the leading dims."""
    a, b = np.asarray(a), np.asarray(b)
    cdt = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    a, b = a.astype(cdt), b.astype(cdt)
    T, D = b.shape[-2:]
    lead = [a.shape[: a.ndim - (3 if dense else 2)], b.shape[:-2]]
    if x0 is not None:
        x0 = np.asarray(x0).astype(cdt)
        lead.append(x0.shape[:-1])
    batch = np.broadcast_shapes(*lead)
    x = np.zeros((*batch, D), cdt) if x0 is None else np.broadcast_to(x0, (*batch, D)).copy()
    out = np.empty((*batch, T, D), cdt)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        if dense:
            x = np.einsum("...ij,...j->...i", a[..., t, :, :], x) + b[..., t, :]
        else:
            x = a[..., t, :] * x + b[..., t, :]
        out[..., t, :] = x
    return out


def scan_autograd(a, b, x0=None, *, dense: bool, reverse: bool = False) -> torch.Tensor:
    """The same loop in torch, differentiated by plain autograd."""
    T = b.shape[-2]
    xs = [None] * T
    x = x0
    for t in range(T - 1, -1, -1) if reverse else range(T):
        at = a[..., t, :, :] if dense else a[..., t, :]
        if x is None:
            x = b[..., t, :]
        elif dense:
            x = (at @ x.unsqueeze(-1)).squeeze(-1) + b[..., t, :]
        else:
            x = at * x + b[..., t, :]
        xs[t] = x
    xs = torch.broadcast_tensors(*xs)
    return torch.stack(xs, dim=-2)
