"""Log-depth associative scans in pure torch.

The combine for two consecutive steps (a_i, b_i) then (a_j, b_j) is (a_j a_i, a_j b_i + b_j);
it is associative, so the T steps can be reduced in a tree.

``parallel_scan`` (the ``"parallel"`` backend) is an odd-even (cyclic) reduction, the recursive
form of Blelloch's work-efficient scan: combine neighbouring pairs to get a half-length problem
for the odd steps, solve it recursively, then fill in each even step from its left neighbour.
Depth 2 log2(T), work O(T) (about 2T combines), and any T works: an odd step left over at the
end of a level is just filled in on the way back. Each level is a handful of whole-tensor ops on
strided views, so the cost is log2(T) kernel launches, not T.

``hillis_steele_scan`` is the simpler alternative (log2(T) rounds, each combining every step with
the one 2^k before it): half the depth, O(T log T) work. benchmarks/scan.py times both. On this
project's 2-core CPU Hillis-Steele is up to 2x faster only where everything is tiny and per-op
overhead rules (one channel, T <= 1e4: about 4 ops per round against about 8 per level); as
soon as there is data to move, the work-efficient reduction wins by roughly the log2(T)/2 work
ratio (B*D = 64, T = 1e5: 11x; T = 1e6: 17x). A library is used at scale, so ``"parallel"`` is
the odd-even reduction.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._ops import a_time, apply, apply_add, batch_shape_of, compose, flip_time


def _odd_even(a: Tensor, b: Tensor, x0: Tensor | None, dense: bool) -> Tensor:
    T, D = b.shape[-2], b.shape[-1]
    if T == 1:
        return b.clone() if x0 is None else apply_add(a_time(a, 0, dense), x0, b[..., 0, :],
                                                      dense).unsqueeze(-2)
    n = T // 2  # pairs (2k, 2k+1), k < n
    a_ev, a_od = a_time(a, slice(0, 2 * n, 2), dense), a_time(a, slice(1, 2 * n, 2), dense)
    b_ev, b_od = b[..., 0 : 2 * n : 2, :], b[..., 1 : 2 * n : 2, :]  # (..., n, D)
    # x_{2k+1} = (a_{2k+1} a_{2k}) x_{2k-1} + (a_{2k+1} b_{2k} + b_{2k+1}), x_{-1} = x0
    x_od = _odd_even(compose(a_od, a_ev, dense), apply_add(a_od, b_ev, b_od, dense), x0, dense)
    batch = torch.broadcast_shapes(x_od.shape[:-2], b.shape[:-2])
    out = torch.empty((*batch, T, D), dtype=b.dtype, device=b.device)  # (..., T, D)
    out[..., 1::2, :] = x_od
    # x_{2k} = a_{2k} x_{2k-1} + b_{2k} for k >= 1; x_0 = a_0 x0 + b_0
    m = (T + 1) // 2 - 1  # even steps after the first
    if m > 0:
        out[..., 2::2, :] = apply_add(a_time(a, slice(2, None, 2), dense), x_od[..., :m, :],
                                      b[..., 2::2, :], dense)
    out[..., 0, :] = b[..., 0, :] if x0 is None else apply_add(a_time(a, 0, dense), x0,
                                                               b[..., 0, :], dense)
    return out


def parallel_scan(
    a: Tensor, b: Tensor, x0: Tensor | None, *, dense: bool, reverse: bool = False
) -> Tensor:
    if x0 is None:  # a zero start, not none: the loop's 0 * a_1 keeps a nan or inf of a_1
        x0 = b.new_zeros(b.shape[-1])  # (D,), broadcast
    if reverse:
        out = _odd_even(flip_time(a, dense), b.flip(-2), x0, dense).flip(-2)
    else:
        out = _odd_even(a, b, x0, dense)
    batch = batch_shape_of(a, b, x0, dense)
    if out.shape[:-2] != batch:  # T == 1 with b narrower than a or x0
        out = out.expand(*batch, *out.shape[-2:]).contiguous()
    return out


def hillis_steele_scan(
    a: Tensor, b: Tensor, x0: Tensor | None, *, dense: bool, reverse: bool = False
) -> Tensor:
    if reverse:
        a, b = flip_time(a, dense), b.flip(-2)
    T = b.shape[-2]
    batch = batch_shape_of(a, b, x0, dense)
    acc_b = b.expand(*batch, *b.shape[-2:]).clone()  # (..., T, D)
    if x0 is not None:
        acc_b[..., 0, :] += apply(a_time(a, 0, dense), x0, dense)
    acc_a = a
    s = 1
    while s < T:
        # step t absorbs the 2^k steps ending at t - s
        new_b = acc_b.clone()
        new_b[..., s:, :] += apply(a_time(acc_a, slice(s, None), dense), acc_b[..., :-s, :],
                                   dense)
        # both pieces are slices of acc_a, so they share its batch shape
        acc_a = torch.cat([a_time(acc_a, slice(None, s), dense),
                           compose(a_time(acc_a, slice(s, None), dense),
                                   a_time(acc_a, slice(None, -s), dense), dense)],
                          dim=-3 if dense else -2)
        acc_b, s = new_b, 2 * s
    return acc_b.flip(-2) if reverse else acc_b
