"""``paraseq.distributed.linear_scan``: x_t = a_t x_{t-1} + b_t with time split across ranks.

Shape letters: ``...`` batch dims (the same on every rank), T_r this rank's time steps,
D state size, P ranks.

The algorithm (forward direction; reverse runs the ranks and the steps the other way):
1. each rank takes the summary of its chunk: e_r, the chunk's end state scanned from a zero
   carry (the first rank scans from x0 and already has its true states), and A_r, the product
   of its coefficients a_T ... a_1 (only ranks strictly inside the scan order need it: the
   first rank's carry-in is x0, and nobody reads the last rank's product);
2. one all-gather of (A_r, e_r): O(D) bytes per rank for diagonal a, O(D^2) for dense, not O(T);
3. each rank composes the summaries before it, c_r = A_{r-1} c_{r-1} + e_{r-1} (c_1 = e_0),
   and scans its chunk again from the carry-in c_r (the fix-up).
The local scans are ``paraseq.linear_scan`` (numba on a CPU, triton on a GPU). The backward is
the same algorithm in the other direction on the adjoint (see ``_DistScan``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..scan import linear_scan as _local_scan
from ..scan._ops import adjoint, apply
from ..scan.api import _resolve_structure, _sum_to
from ._comm import Comm, real_view

__all__ = ["linear_scan"]


def chunk_product(a: Tensor, dense: bool, reverse: bool) -> Tensor:
    """The product of a chunk's coefficients: a_T ... a_1 (reverse: a_1 ... a_T).
    Diagonal: (..., D); dense: (..., D, D), by a log-depth tree of batched matmuls."""
    if not dense:
        return a.prod(dim=-2)
    m = a.flip(-3) if reverse else a  # (..., T, D, D)
    if m.shape[-3] == 0:
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        return eye.expand(*m.shape[:-3], *eye.shape).clone()
    while m.shape[-3] > 1:
        if m.shape[-3] % 2:
            eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
            m = torch.cat([m, eye.expand(*m.shape[:-3], 1, *eye.shape)], dim=-3)
        m = torch.matmul(m[..., 1::2, :, :], m[..., 0::2, :, :])
    return m[..., 0, :, :]


def dist_scan(comm: Comm, a: Tensor, b: Tensor, x0: Tensor | None, dense: bool, reverse: bool,
              batch: torch.Size, extra: Tensor | None = None, error: BaseException | None = None,
              what: str = "the scan", spec: tuple | None = None
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The distributed scan without autograd and without input checks (the callers check).

    a, b, x0 as ``paraseq.linear_scan`` (x0 read only on the first rank in scan order), with
    full batch shape ``batch``. ``extra``: a few real numbers (k,) gathered in the same
    all-gather (the solvers' residual). ``error``: this rank's local work already failed; it
    joins the exchange so that every rank raises; then a and b may be None, and ``spec``
    = (D, dtype, device) says what they would have been.

    Returns (x (..., T_r, D), c (..., D): the state before this chunk in scan order (x0 or
    zeros on the first rank), the gathered extras (P, k) or None)."""
    P, rank = comm.size, comm.rank
    q = P - 1 - rank if reverse else rank  # position in scan order
    D, dtype, device = spec if b is None else (b.shape[-1], b.dtype, b.device)
    rdtype = real_view(torch.zeros((), dtype=dtype)).dtype
    cplx = 2 if dtype.is_complex else 1
    n_e = batch.numel() * D
    n_a = n_e * D if dense else n_e
    k = 0 if extra is None else extra.numel()
    size = k + (n_a + n_e) * cplx
    x = e = prod = None
    if error is None:
        try:
            T = b.shape[-2]
            if q == 0:  # the true states already: scan from x0
                x = _local_scan(a, b, x0, reverse=reverse,
                                structure="dense" if dense else "diagonal")
                x = x.expand(*batch, T, D)
                if T:
                    e = x[..., 0 if reverse else T - 1, :]
                else:
                    e = (x0 if x0 is not None else b.new_zeros(D)).expand(*batch, D)
            else:
                xz = _local_scan(a, b, None, reverse=reverse,
                                 structure="dense" if dense else "diagonal") if T else None
                e = xz[..., 0 if reverse else T - 1, :].expand(*batch, D) if T else \
                    b.new_zeros(*batch, D)
            if 0 < q < P - 1:
                prod = chunk_product(a, dense, reverse)
                prod = prod.expand(*batch, D, D) if dense else prod.expand(*batch, D)
            parts = [] if extra is None else [extra.reshape(-1).to(rdtype)]
            parts.append(real_view(prod.contiguous()).reshape(-1) if prod is not None
                         else torch.zeros(n_a * cplx, dtype=rdtype, device=device))
            parts.append(real_view(e.contiguous()).reshape(-1))
            payload = torch.cat(parts)
        except Exception as exc:
            error, payload = exc, None
    else:
        payload = None
    rows = comm.gather(payload, size, rdtype, error, what)  # (P, size)
    rows = rows.to(device)
    extras = rows[:, :k] if k else None
    if q == 0:
        c = (x0.expand(*batch, D).clone() if x0 is not None else
             torch.zeros(*batch, D, dtype=dtype, device=device))
        return x, c, extras
    body = rows[:, k:]

    def unpack(r: int) -> tuple[Tensor, Tensor]:
        row = body[r]
        A = row[:n_a * cplx]
        E = row[n_a * cplx:]
        if cplx == 2:
            A = torch.view_as_complex(A.reshape(-1, 2).clone())
            E = torch.view_as_complex(E.reshape(-1, 2).clone())
        A = A.reshape(*batch, D, D) if dense else A.reshape(*batch, D)
        return A, E.reshape(*batch, D)

    order = list(range(P - 1, -1, -1)) if reverse else list(range(P))
    c = unpack(order[0])[1]  # the first rank's end state: the true state there
    for r in order[1:q]:
        A, E = unpack(r)
        c = (torch.matmul(A, c.unsqueeze(-1)).squeeze(-1) if dense else A * c) + E
    x = _local_scan(a, b, c, reverse=reverse, structure="dense" if dense else "diagonal")
    return x, c, extras


class _DistScan(torch.autograd.Function):
    """The distributed scan with a distributed adjoint as its backward.

    Backward (forward direction): lambda_t = g_t + a_{t+1}^H lambda_{t+1} couples the ranks
    through a coefficient of the NEXT rank. Written for nu_t = a_t^H lambda_t it reads
    nu_t = a_t^H g_t + a_t^H nu_{t+1}: a reverse scan of this rank's own coefficients, so it is
    ``dist_scan`` again, in the other direction. Then lambda_t = g_t + nu_{t+1} (nu_{T_r+1} is
    that scan's carry-in from the next rank), dL/db = lambda, dL/da_t = lambda_t x_{t-1}^H
    (x_0 of this chunk: the forward's carry-in), dL/dx0 = nu_1 on the first rank. Every rank
    must run the backward (each rank's loss reaches its own chunk), as every rank ran the
    forward.
    """

    @staticmethod
    def forward(ctx, a, b, x0, comm, dense, reverse, batch):
        x, c, _ = dist_scan(comm, a, b, x0, dense, reverse, batch)
        ctx.comm, ctx.dense, ctx.reverse, ctx.batch = comm, dense, reverse, batch
        ctx.has_x0 = x0 is not None
        ctx.shapes = (a.shape, b.shape, None if x0 is None else x0.shape)
        ctx.save_for_backward(a, x, c)
        return x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        a, x, c = ctx.saved_tensors
        comm, dense, reverse, batch = ctx.comm, ctx.dense, ctx.reverse, ctx.batch
        aH = adjoint(a, dense)
        g = g.expand_as(x)
        nu, nu_in, _ = dist_scan(comm, aH, apply(aH, g, dense), None, dense, not reverse, batch,
                                 what="the backward scan")
        T = x.shape[-2]
        if reverse:  # lambda_t = g_t + nu_{t-1}
            nu_next = torch.cat([nu_in.unsqueeze(-2), nu[..., :T - 1, :]], dim=-2)
            x_prev = torch.cat([x[..., 1:, :], c.unsqueeze(-2)], dim=-2)
        else:  # lambda_t = g_t + nu_{t+1}
            nu_next = torch.cat([nu[..., 1:, :], nu_in.unsqueeze(-2)], dim=-2)
            x_prev = torch.cat([c.unsqueeze(-2), x[..., :T - 1, :]], dim=-2)
        lam = g + nu_next[..., :T, :]  # (..., T, D)
        a_shape, b_shape, x0_shape = ctx.shapes
        grad_a = grad_b = grad_x0 = None
        if ctx.needs_input_grad[0]:
            xp = x_prev.conj() if x_prev.is_complex() else x_prev
            grad_a = _sum_to(lam.unsqueeze(-1) * xp.unsqueeze(-2) if dense else lam * xp,
                             a_shape)
        if ctx.needs_input_grad[1]:
            grad_b = _sum_to(lam, b_shape)
        if ctx.has_x0 and ctx.needs_input_grad[2]:
            first = (comm.size - 1 if reverse else 0) == comm.rank
            if first:
                g0 = nu[..., T - 1 if reverse else 0, :] if T else nu_in
                grad_x0 = _sum_to(g0, x0_shape)
            else:
                grad_x0 = torch.zeros(x0_shape, dtype=x.dtype, device=x.device)
        return grad_a, grad_b, grad_x0, None, None, None, None


def _describe(f: dict) -> str:
    what = "dense" if f["dense"] else "diagonal"
    return (f"{what} a, batch dims {f['batch']}, D = {f['D']}, dtype {f['dtype']}, "
            f"reverse={f['reverse']}")


def linear_scan(a: Tensor, b: Tensor, x0: Tensor | None = None, *, group=None,
                reverse: bool = False, structure: str = "auto") -> Tensor:
    """``paraseq.linear_scan`` over a sequence whose time dim is split across the ranks.

    Every rank of ``group`` (default: the whole world) calls it at once with its own
    consecutive slice of the time dim, in rank order (rank 0 holds the first steps): a
    (..., T_r, D) or (..., T_r, D, D), b (..., T_r, D). The slices may differ in length, and
    may be empty. It returns this rank's slice x (..., T_r, D) of the scan of the
    concatenated sequence: the single-process ``paraseq.linear_scan`` result, to rounding.

    x0: the state before the whole sequence, (..., D) or None (zeros). It is read on the
    rank where the scan starts (rank 0; the last rank with ``reverse=True``); others may pass
    the same tensor or None (their copy gets a zero gradient).

    Every rank must pass the same batch dims, D, dtype, structure and reverse: otherwise every
    rank raises ValueError naming the rank that differs. A rank whose local work raises
    makes every other rank raise ``paraseq.distributed.PeerError`` (never a hang).

    Cost per call: two local scans of T_r steps (one where the scan starts), the product of
    the local coefficients on ranks strictly inside the scan order (dense: a tree of batched
    matmuls), one all-gather of (product, end state): O(B D) bytes per rank for diagonal a,
    O(B D^2) for dense, independent of T; plus one small all-gather of shapes (the check).

    Differentiable in a, b and x0: the backward is one more distributed scan, in the other
    direction (every rank must run the backward: call ``backward`` on every rank).
    """
    comm = Comm(group, "linear_scan", b.device if isinstance(b, Tensor) else torch.device("cpu"))
    error = None
    fields = {"batch": (), "D": 0, "dtype": torch.float32, "dense": False, "reverse": False,
              "x0": False}
    T = 0
    try:
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise TypeError(f"paraseq.distributed.linear_scan: a and b must be tensors; got "
                            f"{type(a).__name__} and {type(b).__name__}")
        if x0 is not None and not isinstance(x0, Tensor):
            raise TypeError(f"paraseq.distributed.linear_scan: x0 must be a tensor (..., D) or "
                            f"None; got {type(x0).__name__}")
        if b.dim() < 2:
            raise ValueError(f"paraseq.distributed.linear_scan: b must have shape (..., T, D); "
                             f"got {tuple(b.shape)}")
        if not isinstance(reverse, bool):
            raise TypeError(f"paraseq.distributed.linear_scan: reverse must be a bool; got "
                            f"{reverse!r}")
        dense = _resolve_structure(a, b, structure)
        for name, v in (("a", a), ("x0", x0)):
            if v is not None and v.dtype != b.dtype:
                raise TypeError(f"paraseq.distributed.linear_scan: {name} has dtype {v.dtype} "
                                f"but b has {b.dtype}; convert them to one dtype")
            if v is not None and v.device != b.device:
                raise ValueError(f"paraseq.distributed.linear_scan: {name} is on {v.device} but "
                                 f"b is on {b.device}; move them to one device")
        if b.dtype not in (torch.float32, torch.float64, torch.complex64, torch.complex128):
            raise TypeError(f"paraseq.distributed.linear_scan: dtype {b.dtype} is not "
                            f"supported; use float32, float64, complex64 or complex128")
        T, D = b.shape[-2], b.shape[-1]
        if x0 is not None and (x0.dim() < 1 or x0.shape[-1] != D):
            raise ValueError(f"paraseq.distributed.linear_scan: x0 must have shape (..., {D}); "
                             f"got {tuple(x0.shape)}")
        shapes = [a.shape[:-3] if dense else a.shape[:-2], b.shape[:-2]]
        if x0 is not None:
            shapes.append(x0.shape[:-1])
        batch = torch.broadcast_shapes(*shapes)
        fields = {"batch": tuple(batch), "D": D, "dtype": b.dtype, "dense": dense,
                  "reverse": reverse, "x0": x0 is not None}
    except Exception as exc:
        error = exc
    # x0 is read on one rank only: its presence need not match across ranks
    check = {k: v for k, v in fields.items() if k != "x0"}
    comm.check_same(check, _describe, error, lengths=T)
    return _DistScan.apply(a, b, x0, comm, fields["dense"], reverse, torch.Size(fields["batch"]))
