"""One loop for every parallel method: evaluate, linearise, scan, measure, stop or go on.

Shape letters: B batch (all leading dims flattened), T time, n input size, D state size.
Trajectories are (B, T, D); ``h0`` is (B, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..scan import linear_scan
from .cell import FlatCell, blocks_to_dense
from .methods import Method, evaluate_rows, linearise_rhs

LM_SHRINK = 0.3
CLIP = 1e8  # DEER's hygiene: iterates are clipped to +-CLIP and nan is reset to 0 mid-iteration


@dataclass
class LoopResult:
    H: Tensor  # (B, T, D) the last iterate
    F: Tensor  # (B, T, D) f(x_t, h_{t-1}) at the last iterate
    converged: bool
    iterations: int
    residuals: list[float] = field(default_factory=list)
    A: Tensor | None = None  # the last dense Jacobians formed (B, T, D, D), at H or one before


def shift(H: Tensor, h0: Tensor) -> Tensor:
    """The state each step reads: (h0, h_1, ..., h_{T-1})."""
    return torch.cat([h0.unsqueeze(-2), H[..., :-1, :]], dim=-2)  # (B, T, D)


def residual_map(H: Tensor, F: Tensor) -> Tensor:
    """|h_t - f(x_t, h_{t-1})| scaled elementwise by 1 + |f|: absolute for states of order one
    or less, relative for large ones. nan stays nan (and so never passes a tolerance)."""
    return (H - F).abs() / (1 + F.abs())  # (B, T, D)


def residual_max(H: Tensor, F: Tensor) -> float:
    """``residual_map(H, F).max()`` as a float (0 for empty tensors; nan where any is), in
    three passes over the data with two temporaries instead of six passes with five (2.4 ->
    1.2 ms over 1.3e6 float32 values): it is taken once per iteration."""
    if H.numel() == 0:
        return 0.0
    with torch.no_grad():
        return float(torch.sub(H, F).abs_().div_(F.abs().add_(1)).max())


def first_failure(res: Tensor, tol: float) -> int:
    """The first time step whose residual (over batch and features) is not <= tol, or T."""
    bad = ~(res <= tol).all(dim=-1).all(dim=0)  # (T,)
    idx = torch.nonzero(bad)
    return int(idx[0]) if idx.numel() else res.shape[-2]


def evaluate(fc: FlatCell, X: Tensor, Hp: Tensor) -> Tensor:
    """f(x_t, h_{t-1}) for all B x T rows in one call of the cell."""
    B, T, D = Hp.shape
    return fc(X.reshape(B * T, X.shape[-1]), Hp.reshape(B * T, D)).reshape(B, T, D)


def sequential(fc: FlatCell, X: Tensor, h0: Tensor, cell_dtype: torch.dtype) -> Tensor:
    """The loop: one call of the cell per step on all B rows; returns (B, T, D) in h0's dtype."""
    h = h0.to(cell_dtype)
    out = []
    for t in range(X.shape[1]):
        h = fc(X[:, t], h)
        out.append(h)
    if not out:
        return h0.new_zeros(X.shape[0], 0, h0.shape[-1])
    return torch.stack(out, dim=1).to(h0.dtype)  # (B, T, D)


def _sanitize(H: Tensor) -> Tensor:
    return torch.nan_to_num(H, nan=0.0, posinf=CLIP, neginf=-CLIP).clamp_(-CLIP, CLIP)


def _lin(fc: FlatCell, method: Method, source: str | None, X: Tensor, Hp: Tensor,
         cell_dtype: torch.dtype, samples: int, generator: torch.Generator | None
         ) -> tuple[Tensor, Tensor | None]:
    """f and A on all rows, in the cell's dtype for the call and the iterate's dtype after."""
    return _lin_rhs(fc, method, source, X, Hp, cell_dtype, samples, generator)[:2]


def _lin_rhs(fc: FlatCell, method: Method, source: str | None, X: Tensor, Hp: Tensor,
             cell_dtype: torch.dtype, samples: int, generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``_lin`` and, where the compiled Jacobian formed it, the scan's b = f - A h (B, T, D)."""
    B, T, D = Hp.shape
    F, A, b = linearise_rhs(fc, method, source, X.reshape(B * T, X.shape[-1]),
                            Hp.reshape(B * T, D).to(cell_dtype), samples=samples,
                            generator=generator)
    F = F.reshape(B, T, D).to(Hp.dtype)
    if A is not None:
        A = A.reshape(B, T, *A.shape[1:]).to(Hp.dtype)
    if b is not None:
        b = b.reshape(B, T, D).to(Hp.dtype)
    return F, A, b


def _eval(fc: FlatCell, source: str | None, X: Tensor, Hp: Tensor, cell_dtype: torch.dtype
          ) -> Tensor:
    """f on all rows only (no Jacobian), in the iterate's dtype: (B, T, D)."""
    B, T, D = Hp.shape
    F = evaluate_rows(fc, source, X.reshape(B * T, X.shape[-1]),
                      Hp.reshape(B * T, D).to(cell_dtype))
    return F.reshape(B, T, D).to(Hp.dtype)


def _lin_dense(fc, method, source, X, Hp, cell_dtype):
    """``_lin`` with the Jacobian always dense (B, T, D, D) (damped_newton's normal matrix)."""
    F, J = _lin(fc, method, source, X, Hp, cell_dtype, 0, None)
    return F, (blocks_to_dense(J) if J is not None and J.dim() == 5 else J)


def newton_step(method: Method, F: Tensor, A: Tensor | None, Hp: Tensor, h0: Tensor,
                b: Tensor | None = None) -> Tensor:
    """Solve h_t = A_t h_{t-1} + (f_t - A_t h^(k)_{t-1}), h_0 = h0, by one scan; ``b``, where
    given, is f_t - A_t h^(k)_{t-1} already formed."""
    if method.structure == "zero":
        return F.clone()
    if method.structure == "identity":
        return linear_scan(torch.ones_like(F), F - Hp, h0, structure="diagonal")
    if A is not None and A.dim() == 5:  # diagonal blocks (B, T, G, k, k)
        return _block_step(F, A, Hp, h0)
    dense = method.structure == "dense"
    if b is None:
        AHp = torch.matmul(A, Hp.unsqueeze(-1)).squeeze(-1) if dense else A * Hp
        b = F - AHp
    return linear_scan(A, b, h0, structure="dense" if dense else "diagonal")


def to_blocks(V: Tensor, k: int) -> Tensor:
    """(..., D) -> (..., G, k): entry s G + g goes to [g, s] (see ``blocks_to_dense``)."""
    return V.unflatten(-1, (k, V.shape[-1] // k)).transpose(-1, -2)


def from_blocks(V: Tensor) -> Tensor:
    """(..., G, k) -> (..., D), the inverse of ``to_blocks``."""
    return V.transpose(-1, -2).flatten(-2)


def block_scan(A: Tensor, b: Tensor, h0: Tensor | None, reverse: bool = False) -> Tensor:
    """x_t = A_t x_{t-1} + b_t for block-diagonal A (B, T, G, k, k), b (B, T, D): G
    independent k x k recurrences, one dense scan over the batch (B, G)."""
    k = A.shape[-1]
    a = A.transpose(1, 2)  # (B, G, T, k, k)
    bb = to_blocks(b, k).transpose(1, 2)  # (B, G, T, k)
    x0 = None if h0 is None else to_blocks(h0, k)  # (B, G, k)
    x = linear_scan(a, bb, x0, reverse=reverse, structure="dense")  # (B, G, T, k)
    return from_blocks(x.transpose(1, 2))  # (B, T, D)


def _block_step(F: Tensor, A: Tensor, Hp: Tensor, h0: Tensor) -> Tensor:
    k = A.shape[-1]
    AHp = from_blocks(torch.matmul(A, to_blocks(Hp, k).unsqueeze(-1)).squeeze(-1))  # (B, T, D)
    return block_scan(A, F - AHp, h0)


def run(fc: FlatCell, method: Method, source: str | None, X: Tensor, h0: Tensor, H: Tensor, *,
        tol: float, max_iter: int, cell_dtype: torch.dtype, patience: int = 8,
        samples: int = 8, generator: torch.Generator | None = None,
        fixed_iterations: bool = False) -> LoopResult:
    """Iterate from H until the residual is <= tol, ``max_iter`` linear solves were made, or
    the residual has not improved for ``patience`` iterations. With ``fixed_iterations`` exactly
    ``max_iter`` solves are made (the unrolled mode; tensors then carry autograd history)."""
    if method.name == "damped_newton":
        return _levenberg_marquardt(fc, method, source, X, h0, H, tol=tol, max_iter=max_iter,
                                    cell_dtype=cell_dtype, patience=patience,
                                    fixed_iterations=fixed_iterations)
    residuals: list[float] = []
    best, since_best = float("inf"), 0
    k = 0
    last_A = None  # the last dense Jacobians (kept for the caller's polish, ``LoopResult.A``)
    while True:
        Hp = shift(H, h0)  # (B, T, D)
        A = b = None
        if not fixed_iterations and (_expect_converged(residuals, tol, method)
                                     or _expect_chord(residuals, tol, method, last_A)):
            # Newton's error squares each iteration: when the last two residuals say this
            # iterate is converged, or one step with the last Jacobians (a chord step) will
            # converge, f alone is evaluated first and the Jacobian (D times f's cost, or
            # more) only if the residual says otherwise
            F = _eval(fc, source, X, Hp, cell_dtype)
            r = residual_max(H.detach(), F.detach())
            if r <= tol:
                pass
            elif _chord_converges(residuals, r, tol, last_A):
                A = last_A  # the step below is Newton's with the Jacobians one iterate old
            else:
                F, A, b = _lin_rhs(fc, method, source, X, Hp, cell_dtype, samples, generator)
        else:
            F, A, b = _lin_rhs(fc, method, source, X, Hp, cell_dtype, samples, generator)
            r = residual_max(H.detach(), F.detach())
        residuals.append(r)
        if A is not None and A.dim() == 4 and method.structure == "dense" and not (
                fixed_iterations):
            last_A = A
        if not fixed_iterations:
            if r <= tol:
                return LoopResult(H, F, True, k, residuals, last_A)
            if r < 0.5 * best:
                best, since_best = r, 0
            else:
                since_best += 1
            if k >= max_iter or since_best >= patience:
                return LoopResult(H, F, False, k, residuals)
        elif k >= max_iter:
            return LoopResult(H, F, r <= tol, k, residuals)
        H_new = newton_step(method, F, A, Hp, h0, b)
        H = H_new if fixed_iterations else _sanitize(H_new)
        k += 1


def _expect_converged(residuals: list[float], tol: float, method: Method) -> bool:
    """Whether a Newton-type iteration's next residual is predicted under ``tol`` from the last
    two, r_k and r_{k-1}: quadratic convergence, r_{k+1} ~ r_k^2 / r_{k-1}^2 r_k, with a
    margin of 10."""
    r_pred = _newton_prediction(residuals, method)
    return r_pred is not None and r_pred <= 0.1 * tol


def _newton_prediction(residuals: list[float], method: Method) -> float | None:
    """Newton's next residual from the last two, r_k^3 / r_{k-1}^2, or None where the method
    is not Newton-type or the last two are not a finite decrease."""
    if method.structure != "dense" or len(residuals) < 2:
        return None
    r0, r1 = residuals[-2], residuals[-1]
    if not (0 < r1 < r0 < float("inf")):
        return None
    return r1 * (r1 / r0) ** 2


def _expect_chord(residuals: list[float], tol: float, method: Method,
                  last_A: Tensor | None) -> bool:
    """Whether a chord step (Newton's with the last Jacobians, one iterate old) from this
    iterate is predicted to converge: evaluate f alone first and decide on its residual
    (``_chord_converges``). With r_{k-1}, r_{k-2} the last two residuals, Newton predicts
    r_k ~ r_{k-1}^3 / r_{k-2}^2; a chord step's residual is about r_k^2 / r_{k-1} (its error
    is the product of the last two corrections, where Newton's is the last one squared)."""
    r_pred = _newton_prediction(residuals, method) if last_A is not None else None
    return r_pred is not None and r_pred * r_pred / residuals[-1] <= 0.1 * tol


def _chord_converges(residuals: list[float], r: float, tol: float,
                     last_A: Tensor | None) -> bool:
    """Whether the chord step from an iterate with residual r is predicted under ``tol``
    (see ``_expect_chord``): r^2 / r_{k-1} <= tol / 10."""
    if last_A is None or not residuals:
        return False
    r1 = residuals[-1]
    return 0 < r < r1 < float("inf") and r * r / r1 <= 0.1 * tol


def _levenberg_marquardt(fc: FlatCell, method: Method, source: str | None, X: Tensor,
                         h0: Tensor, H: Tensor, *, tol: float, max_iter: int,
                         cell_dtype: torch.dtype, patience: int,
                         fixed_iterations: bool) -> LoopResult:
    """Damped Newton: minimise sum_t |h_t - f(x_t, h_{t-1})|^2 over the whole trajectory by
    Levenberg-Marquardt steps (M^T M + lam I) dH = -M^T r, where M = dr/dH is block
    bidiagonal (I on the diagonal, -J_{t+1} below it). M^T M + lam I is block tridiagonal and
    SPD, solved in O(log T) depth by block cyclic reduction (``tridiag``). lam = 0 is the
    Newton step, taken by the scan (better conditioned than the normal equations); a large lam
    is a short gradient step. A step is taken only if it lowers the sum of squares: lam starts
    at 0 (plain Newton while Newton helps), becomes 1e-3 and grows x10 after a step that does
    not help, and shrinks x0.3 (back to 0 below 1e-6) after one that does. This is the trust
    region idea of ELK (Gonzalez et al., 2024), which fixes lam and solves the same problem as
    a Kalman smoother; here lam adapts and the solve is a block tridiagonal system.

    It pays where Newton's full steps overshoot and blow up (strong curvature, see the tests);
    where Newton's steps are good it is Newton. Since the sum of squares ignores that Newton
    makes one more step exact per iteration, on long chaotic problems it can be slower than
    Newton: the fallback still returns the right trajectory."""
    from .tridiag import solve_block_tridiagonal

    B, T, D = H.shape
    residuals: list[float] = []
    lam = 0.0  # start as Newton; damp only once a full step fails to help
    eye = torch.eye(D, dtype=H.dtype, device=H.device)
    Hp = shift(H, h0)
    F, J = _lin_dense(fc, method, source, X, Hp, cell_dtype)  # J: (B, T, D, D)
    best, since_best = float("inf"), 0
    k = 0
    while True:
        r_vec = H - F  # (B, T, D)
        r = residual_max(H.detach(), F.detach())
        residuals.append(r)
        if not fixed_iterations and r <= tol:
            return LoopResult(H, F, True, k, residuals)
        if r < 0.5 * best:
            best, since_best = r, 0
        else:
            since_best += 1
        if k >= max_iter or (not fixed_iterations and since_best >= patience):
            return LoopResult(H, F, r <= tol, k, residuals)
        sq = (r_vec.detach() ** 2).sum()
        Jn = J[:, 1:]  # (B, T-1, D, D): J_{t+1}, the block below the diagonal of -M
        JnT = Jn.transpose(-1, -2)
        # M^T r: r_t - J_{t+1}^T r_{t+1}
        Mtr = r_vec.clone()
        Mtr[:, :-1] -= torch.matmul(JnT, r_vec[:, 1:].unsqueeze(-1)).squeeze(-1)
        base = eye.expand(B, T, D, D).clone()
        base[:, :-1] += torch.matmul(JnT, Jn)  # I + J_{t+1}^T J_{t+1}
        for _ in range(12):  # raise lam until the step lowers the sum of squares
            if lam == 0.0:  # the Newton step itself, by the (better conditioned) scan
                H_try = newton_step(method, F, J, shift(H, h0), h0)
            else:
                try:
                    H_try = H + solve_block_tridiagonal(base + lam * eye, -Jn, -Mtr)
                except torch.linalg.LinAlgError:  # lost positive definiteness to rounding
                    lam = max(10.0 * lam, 1e-3)
                    continue
            H_try = H_try if fixed_iterations else _sanitize(H_try)
            F_try, J_try = _lin_dense(fc, method, source, X, shift(H_try, h0), cell_dtype)
            sq_try = ((H_try - F_try).detach() ** 2).sum()
            if bool(sq_try < sq) or fixed_iterations:
                lam = lam * LM_SHRINK if lam * LM_SHRINK >= 1e-6 else 0.0
                H, F, J = H_try, F_try, J_try
                break
            lam = max(10.0 * lam, 1e-3)
        else:  # no step helped: stop here, the caller falls back
            return LoopResult(H, F, False, k, residuals)
        k += 1
