"""The pure-torch twin of the dense fused Newton kernels (``_dense_kernels.py``): the same
mathematics in plain tensor ops, for CUDA machines without triton, for states wider than the
kernels hold, and as the reference the kernels are tested against.

Shape letters: B batch, T time, H hidden size, K gates (Elman 1, GRU 3, LSTM 4), D state size
(H; the LSTM 2 H, its state the concatenation [h, c]).

The cells are torch.nn's (``paraseq.cells.functional``: elman tanh/relu, gru, lstm) over
precomputed input pre-activations gi = W_ih x + b_ih (B, T, K H); weight_hh is the dense
(K H, H) matrix. The recurrent half enters through G = h W_hh^T (B, T, K H), the hidden
projection of the whole iterate as one GEMM (``project``; the caller adds nothing: the bias
b_hh is added where G is read). At step t the cell reads gh_t = G_{t-1} + b_hh (G0 + b_hh at
t = 0, G0 = h0 W_hh^T) and the previous state x_{t-1} (x0 at t = 0), and gives

    f_t (B, T, D),   J_t = d f_t / d x_{t-1} (B, T, D, D),

with J_t = diag(a_t) + sum_k diag(C_k,t) W_k (W_k the gate-k block of weight_hh; the LSTM's
in 2 x 2 blocks over [h, c], see ``_lstm``). One Newton iteration from the iterate x is the
dense linear scan x'_t = J_t x'_{t-1} + (f_t - J_t x_{t-1}) (``linearise`` forms its
right-hand side); the residual of x is |x_t - f_t| / (1 + |f_t|) (``paraseq.solve``'s scaled
residual), formed by the same evaluation (at the start of the next iteration).

The adjoint at a solution x* for a loss with gradient g = dL/dx (B, T, D): with
mu_t = J_t^T lambda_t, lambda_t = g_t + mu_{t+1} (mu_T = 0) is the reverse scan
mu_t = J_t^T mu_{t+1} + J_t^T g_t (``adjoint_scan_terms``); then the gradients of the gate
pre-activations (``gate_grads``): dgi_t (B, T, K H) and dgh_t = dL/d(gh_t), from which
dweight_hh = sum_t dgh_t x_{t-1}^T and dbias_hh = sum_t dgh_t are GEMMs and sums, and
d x0 = mu_0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..scan.parallel import parallel_scan
from .twin import residual, sanitize

__all__ = ["CELLS", "GATES", "adjoint_scan_terms", "gate_grads", "linearise", "loop",
           "project", "scan", "state_size"]

CELLS = ("gru", "rnn_tanh", "rnn_relu", "lstm")
GATES = {"gru": 3, "rnn_tanh": 1, "rnn_relu": 1, "lstm": 4}


def state_size(cell: str, H: int) -> int:
    return 2 * H if cell == "lstm" else H


def project(x: Tensor, w: Tensor) -> Tensor:
    """G = h W_hh^T for the iterate x (B, T, D) (h its first H features): (B, T, K H), one
    GEMM (cuBLAS on a GPU); the kernels read it as is."""
    H = w.shape[1]
    return torch.matmul(x[..., :H], w.t())  # (B, T, K H)


def _shift(s: Tensor, s0: Tensor) -> Tensor:
    """(s0, s_1, ..., s_{T-1}) for s (B, T, F), s0 (B, F)."""
    return torch.cat([s0.unsqueeze(1), s[:, :-1]], dim=1)


# ----------------------------------------------------------------------------- the cells


def _parts(cell: str, gi: Tensor, gh: Tensor, xp: Tensor, w: Tensor, jac: bool = True):
    """The cell at (gi, gh = W_hh h_{t-1} + b_hh (..., K H), xp = x_{t-1} (..., D)):
    f (..., D), J (..., D, D) and ``grads``, a function of lambda (..., D) returning
    (dgi, dgh) (..., K H), the gradients of the gate pre-activations from either side; J None
    without ``jac`` (the loop)."""
    gi = gi.to(xp.dtype)
    H = w.shape[1]
    if cell in ("rnn_tanh", "rnn_relu"):
        pre = gi + gh
        if cell == "rnn_tanh":
            f = torch.tanh(pre)
            slope = 1 - f * f
        else:
            f = torch.relu(pre)
            slope = (pre > 0).to(pre.dtype)  # 0 at pre == 0, as autograd's relu
        J = slope.unsqueeze(-1) * w if jac else None  # (..., H, H)

        def grads(lam):
            d = lam * slope
            return d, d
        return f, J, grads
    if cell == "gru":
        r = torch.sigmoid(gi[..., :H] + gh[..., :H])
        z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
        ghn = gh[..., 2 * H:]
        n = torch.tanh(gi[..., 2 * H:] + r * ghn)
        f = (xp - n) * z + n
        dn = (1 - z) * (1 - n * n)
        C = (dn * ghn * r * (1 - r), (xp - n) * z * (1 - z), dn * r)
        W = w.view(3, H, H)
        J = (sum(c.unsqueeze(-1) * W[k] for k, c in enumerate(C)) + torch.diag_embed(z)
             if jac else None)  # (..., H, H)

        def grads(lam):
            gr, gz = lam * C[0], lam * C[1]
            return (torch.cat([gr, gz, lam * dn], -1), torch.cat([gr, gz, lam * C[2]], -1))
        return f, J, grads
    # lstm over [h, c]
    cp = xp[..., H:]  # (..., H); h_{t-1} enters through gh only
    gates = gi + gh
    i = torch.sigmoid(gates[..., :H])
    fg = torch.sigmoid(gates[..., H:2 * H])
    g = torch.tanh(gates[..., 2 * H:3 * H])
    o = torch.sigmoid(gates[..., 3 * H:])
    c = fg * cp + i * g
    tc = torch.tanh(c)
    h = o * tc
    s = o * (1 - tc * tc)
    ci, cf, cg, co = g * i * (1 - i), cp * fg * (1 - fg), i * (1 - g * g), tc * o * (1 - o)
    W = w.view(4, H, H)

    def grads(lam):
        lh, lc = lam[..., :H], lam[..., H:]
        gcn = lc + lh * s
        d = torch.cat([gcn * ci, gcn * cf, gcn * cg, lh * co], -1)
        return d, d
    if not jac:
        return torch.cat([h, c], -1), None, grads
    ch = ci.unsqueeze(-1) * W[0] + cf.unsqueeze(-1) * W[1] + cg.unsqueeze(-1) * W[2]
    top = torch.cat([s.unsqueeze(-1) * ch + co.unsqueeze(-1) * W[3], torch.diag_embed(s * fg)],
                    -1)  # (..., H, 2 H)
    bottom = torch.cat([ch, torch.diag_embed(fg)], -1)
    J = torch.cat([top, bottom], -2)  # (..., 2 H, 2 H)
    return torch.cat([h, c], -1), J, grads


def _at(cell: str, gi: Tensor, G: Tensor, G0: Tensor, b: Tensor, x: Tensor, x0: Tensor,
        w: Tensor, jac: bool = True):
    """The cell at every step of the iterate x (B, T, D): f, J, grads (see ``_parts``)."""
    gh = _shift(G, G0) + b  # (B, T, K H)
    return _parts(cell, gi, gh, _shift(x, x0), w, jac)


# ----------------------------------------------------------------------------- forward


def linearise(cell: str, gi: Tensor, G: Tensor, G0: Tensor, w: Tensor, b: Tensor, x: Tensor,
              x0: Tensor, want_j: bool = True):
    """At the iterate x (B, T, D), G = project(x): (J (B, T, D, D), rhs (B, T, D), the residual
    map of x (B, T, D)); J and rhs None when not ``want_j``."""
    f, J, _ = _at(cell, gi, G, G0, b, x, x0, w, want_j)
    res = residual(x, f)
    if not want_j:
        return None, None, res
    rhs = f - (J @ _shift(x, x0).unsqueeze(-1)).squeeze(-1)
    return J, rhs, res


def scan(J: Tensor, rhs: Tensor, x0: Tensor) -> Tensor:
    """The next iterate: the dense linear scan x'_t = J_t x'_{t-1} + rhs_t from x0, cleaned
    (nan -> 0, clipped to +-1e8, as paraseq.solve)."""
    return sanitize(parallel_scan(J, rhs, x0, dense=True))


# ----------------------------------------------------------------------------- backward


def adjoint_scan_terms(cell: str, gi: Tensor, G: Tensor, G0: Tensor, w: Tensor, b: Tensor,
                       x: Tensor, x0: Tensor, g: Tensor):
    """(J^T (B, T, D, D), J^T g (B, T, D)) at the solution x: the reverse scan's terms."""
    _, J, _ = _at(cell, gi, G, G0, b, x, x0, w)
    Jt = J.transpose(-1, -2)
    return Jt, (Jt @ g.unsqueeze(-1)).squeeze(-1)


def gate_grads(cell: str, gi: Tensor, G: Tensor, G0: Tensor, w: Tensor, b: Tensor, x: Tensor,
               x0: Tensor, g: Tensor, mu: Tensor):
    """From g and the reverse scan's mu (B, T, D): (dgi (B, T, K H), dgh shifted one step
    back, dgh_s[t - 1] = dgh_t with dgh_s[T - 1] = 0 (B, T, K H), dgh_0 (B, K H)): so that
    dweight_hh = dgh_s^T h + dgh_0^T h0 is one GEMM over the B T rows."""
    _, _, grads = _at(cell, gi, G, G0, b, x, x0, w, jac=False)
    lam = g + torch.cat([mu[:, 1:], torch.zeros_like(mu[:, :1])], 1)  # (B, T, D)
    dgi, dgh = grads(lam)
    dgh_s = torch.cat([dgh[:, 1:], torch.zeros_like(dgh[:, :1])], 1)
    return dgi, dgh_s, dgh[:, 0]


def weight_grads(dgh_s: Tensor, dgh0: Tensor, x: Tensor, x0: Tensor, H: int):
    """dweight_hh (K H, H) and dbias_hh (K H,) from ``gate_grads``'s dgh: GEMMs and sums
    (shared by the kernels' path)."""
    KH = dgh_s.shape[-1]
    dw = dgh_s.reshape(-1, KH).t() @ x[..., :H].reshape(-1, H) + dgh0.t() @ x0[:, :H]
    return dw, dgh_s.sum((0, 1)) + dgh0.sum(0)


# ----------------------------------------------------------------------------- the loop


def loop(cell: str, gi: Tensor, w: Tensor, b: Tensor, x0: Tensor) -> Tensor:
    """The sequential loop over gi (B, T, K H) from x0 (B, D) (the fallback): (B, T, D)."""
    B, T = gi.shape[:2]
    out, x = [], x0
    H = w.shape[1]
    for t in range(T):
        gh = x[:, :H] @ w.t() + b
        x = _parts(cell, gi[:, t], gh, x, w, jac=False)[0]
        out.append(x)
    return torch.stack(out, 1) if out else x0.new_zeros(B, 0, x0.shape[1])
