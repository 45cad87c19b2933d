"""The pure-torch twin of the fused Newton kernels (``_kernels.py``): the same mathematics in
plain tensor ops, for CUDA machines without triton and as the reference the kernels are tested
against.

Shape letters: B batch, T time, H hidden size, K gates (GRU 3, LSTM 4).

The cells are the diagonal-recurrence GRU and LSTM of ``paraseq.cells.functional`` (diag_gru,
diag_lstm) over precomputed input pre-activations gi = W_ih x + b_ih (B, T, K H); weight_hh
and bias_hh are (K H,) vectors. Every function here takes the state in the working dtype
(float32 for bfloat16/float16 inputs) and casts gi on the fly.

One Newton iteration from the iterate h (B, T, H) (the LSTM: (h, c)) is

    h'_t = f(gi_t, h_{t-1}) + J_t (h'_{t-1} - h_{t-1}),   J_t = df/dh at (gi_t, h_{t-1}),

a linear recurrence in h' with a diagonal J_t (GRU) or H blocks of 2 x 2 (LSTM, over (h_i,
c_i)); then the residual of h', |h'_t - f(gi_t, h'_{t-1})| / (1 + |f|) elementwise. The
adjoint at a solution h* is the reverse recurrence lambda_t = g_t + J_{t+1}^T lambda_{t+1},
from which the gradients of gi, h0, weight_hh and bias_hh are elementwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..scan.parallel import parallel_scan

CLIP = 1e8  # DEER's hygiene, as paraseq.solve: nan -> 0, iterates clipped to +-CLIP


def sanitize(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=CLIP, neginf=-CLIP).clamp_(-CLIP, CLIP)


def shift(s: Tensor, s0: Tensor) -> Tensor:
    """The state each step reads: (s0, s_1, ..., s_{T-1}) for s (B, T, H), s0 (B, H)."""
    return torch.cat([s0.unsqueeze(1), s[:, :-1]], dim=1)  # (B, T, H)


def residual(new: Tensor, f: Tensor) -> Tensor:
    """|new - f| / (1 + |f|) (paraseq.solve's scaled residual); nan reads as inf."""
    return ((new - f).abs() / (1 + f.abs())).nan_to_num_(nan=float("inf"))


# ----------------------------------------------------------------------------- cells


def gru_parts(gi: Tensor, hp: Tensor, w: Tensor, b: Tensor):
    """The diagonal GRU at (gi (..., 3 H), hp (..., H)): f, J (the diagonal Jacobian), and
    the gate derivatives the adjoint needs: P_r, P_z, P_n = d f / d (pre-activations of r, z
    and the tanh of n), and r."""
    H = hp.shape[-1]
    wr, wz, wn = w.view(3, H)
    br, bz, bn = b.view(3, H)
    gi = gi.to(hp.dtype)
    r = torch.sigmoid(gi[..., :H] + wr * hp + br)
    z = torch.sigmoid(gi[..., H:2 * H] + wz * hp + bz)
    hn = wn * hp + bn
    n = torch.tanh(gi[..., 2 * H:] + r * hn)
    f = (hp - n) * z + n
    dn = (1 - z) * (1 - n * n)
    pr = dn * hn * r * (1 - r)
    pz = (hp - n) * z * (1 - z)
    J = z + pr * wr + pz * wz + dn * r * wn
    return f, J, (pr, pz, dn, r)


def lstm_parts(gi: Tensor, hp: Tensor, cp: Tensor, w: Tensor, b: Tensor):
    """The diagonal LSTM at (gi (..., 4 H), hp, cp (..., H)): (f_h, f_c), the 2 x 2 block
    Jacobian per unit (Jhh, Jhc, Jch, Jcc) (rows the outputs h', c', columns the inputs h, c),
    and for the adjoint s = d h'/d c' and the derivatives of c' (C_i, C_f, C_g) and of h'
    (C_o) by the gate pre-activations."""
    H = hp.shape[-1]
    wi, wf, wg, wo = w.view(4, H)
    bi, bf, bg, bo = b.view(4, H)
    gi = gi.to(hp.dtype)
    i = torch.sigmoid(gi[..., :H] + wi * hp + bi)
    f = torch.sigmoid(gi[..., H:2 * H] + wf * hp + bf)
    g = torch.tanh(gi[..., 2 * H:3 * H] + wg * hp + bg)
    o = torch.sigmoid(gi[..., 3 * H:] + wo * hp + bo)
    c = f * cp + i * g
    tc = torch.tanh(c)
    h = o * tc
    s = o * (1 - tc * tc)
    ci, cf, cg = g * i * (1 - i), cp * f * (1 - f), i * (1 - g * g)
    co = tc * o * (1 - o)
    ch = ci * wi + cf * wf + cg * wg
    J = (s * ch + co * wo, s * f, ch, f)
    return (h, c), J, (s, ci, cf, cg, co)


# ----------------------------------------------------------------------------- iterations


def gru_iteration(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor, h: Tensor):
    """One Newton iteration of the diagonal GRU from the iterate h (B, T, H): (h', the
    residual map of h' (B, T, H))."""
    hp = shift(h, h0)
    f, J, _ = gru_parts(gi, hp, w, b)
    new = sanitize(parallel_scan(J, f - J * hp, h0, dense=False))  # (B, T, H)
    f2 = gru_parts(gi, shift(new, h0), w, b)[0]
    return new, residual(new, f2)


def _blocks(J: tuple[Tensor, ...]) -> Tensor:
    """(Jhh, Jhc, Jch, Jcc) each (B, T, H) -> (B, H, T, 2, 2)."""
    A = torch.stack([torch.stack(J[:2], -1), torch.stack(J[2:], -1)], -2)  # (B, T, H, 2, 2)
    return A.transpose(1, 2)


def lstm_iteration(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor, c0: Tensor, h: Tensor,
                   c: Tensor):
    """One Newton iteration of the diagonal LSTM (exact: 2 x 2 blocks) from (h, c): (h', c',
    the residual map of (h', c') (B, T, 2 H))."""
    hp, cp = shift(h, h0), shift(c, c0)
    (fh, fc), J, _ = lstm_parts(gi, hp, cp, w, b)
    bh = fh - J[0] * hp - J[1] * cp
    bc = fc - J[2] * hp - J[3] * cp
    rhs = torch.stack([bh, bc], -1).transpose(1, 2)  # (B, H, T, 2)
    x0 = torch.stack([h0, c0], -1)  # (B, H, 2)
    x = parallel_scan(_blocks(J), rhs, x0, dense=True).transpose(1, 2)  # (B, T, H, 2)
    nh, nc = sanitize(x[..., 0]), sanitize(x[..., 1])
    (gh, gc), _, _ = lstm_parts(gi, shift(nh, h0), shift(nc, c0), w, b)
    return nh, nc, torch.cat([residual(nh, gh), residual(nc, gc)], -1)


# ----------------------------------------------------------------------------- adjoints


def _next(J: Tensor) -> Tensor:
    """J_{t+1} at step t, 0 at the last step: (B, T, ...)."""
    return torch.cat([J[:, 1:], torch.zeros_like(J[:, :1])], dim=1)


def gru_adjoint(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor, hs: Tensor, g: Tensor):
    """The gradients at the solution hs (B, T, H) of sum(g * hs): (dgi (B, T, 3 H), dh0 (B, H),
    dw (3 H,), db (3 H,)), in the working dtype."""
    hp = shift(hs, h0)
    _, J, (pr, pz, dn, r) = gru_parts(gi, hp, w, b)
    lam = parallel_scan(_next(J), g, None, dense=False, reverse=True)  # (B, T, H)
    gr, gz, gn = lam * pr, lam * pz, lam * dn
    dgi = torch.cat([gr, gz, gn], -1)  # (B, T, 3 H)
    db = torch.cat([gr.sum((0, 1)), gz.sum((0, 1)), (gn * r).sum((0, 1))])
    dw = torch.cat([(gr * hp).sum((0, 1)), (gz * hp).sum((0, 1)), (gn * r * hp).sum((0, 1))])
    return dgi, J[:, 0] * lam[:, 0], dw, db


def lstm_adjoint(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor, c0: Tensor, hs: Tensor,
                 cs: Tensor, gh: Tensor, gc: Tensor):
    """The gradients at the solution (hs, cs) of sum(gh * hs + gc * cs): (dgi (B, T, 4 H),
    dh0, dc0 (B, H), dw (4 H,), db (4 H,))."""
    hp, cp = shift(hs, h0), shift(cs, c0)
    _, J, (s, ci, cf, cg, co) = lstm_parts(gi, hp, cp, w, b)
    Jhh, Jhc, Jch, Jcc = (_next(j) for j in J)
    At = _blocks((Jhh, Jch, Jhc, Jcc))  # J_{t+1}^T: (B, H, T, 2, 2)
    rhs = torch.stack([gh, gc], -1).transpose(1, 2)  # (B, H, T, 2)
    lam = parallel_scan(At, rhs, None, dense=True, reverse=True).transpose(1, 2)
    lh, lc = lam[..., 0], lam[..., 1]  # (B, T, H)
    gcn = lc + lh * s  # d loss / d c'
    ga = (gcn * ci, gcn * cf, gcn * cg, lh * co)
    dgi = torch.cat(ga, -1)  # (B, T, 4 H)
    db = torch.cat([a.sum((0, 1)) for a in ga])
    dw = torch.cat([(a * hp).sum((0, 1)) for a in ga])
    lh0, lc0 = lh[:, 0], lc[:, 0]
    dh0 = J[0][:, 0] * lh0 + J[2][:, 0] * lc0
    dc0 = J[1][:, 0] * lh0 + J[3][:, 0] * lc0
    return dgi, dh0, dc0, dw, db


# ----------------------------------------------------------------------------- the loop


def gru_loop(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """The sequential loop (the fallback): (B, T, H)."""
    out, h = [], h0
    for t in range(gi.shape[1]):
        h = gru_parts(gi[:, t], h, w, b)[0]
        out.append(h)
    return torch.stack(out, 1) if out else h0.new_zeros(h0.shape[0], 0, h0.shape[1])


def lstm_loop(gi: Tensor, w: Tensor, b: Tensor, h0: Tensor, c0: Tensor):
    hs, cs, h, c = [], [], h0, c0
    for t in range(gi.shape[1]):
        (h, c), _, _ = lstm_parts(gi[:, t], h, c, w, b)
        hs.append(h)
        cs.append(c)
    if not hs:
        e = h0.new_zeros(h0.shape[0], 0, h0.shape[1])
        return e, e.clone()
    return torch.stack(hs, 1), torch.stack(cs, 1)
