"""The user's function evaluated at many points at once, and its Jacobians, row by row.

Shape letters: K evaluation points (time steps x stages, flattened), B the batch (y0's leading
dims, flattened), D the state size.

The user writes ``func`` for one time point, as for torchdiffeq: ``func(t, y)`` with t a 0-d
tensor and y shaped like y0, ``(*batch, D)``. paraseq evaluates it at K time points in one call
by ``torch.func.vmap`` over a new leading dim (a single point is a plain call), so ``func``
sees exactly the shapes it was written for. The leading dims of y0 are independent systems:
``func`` must not mix them (a batch of initial conditions or of parameters, as in every example
here). Jacobians are then per system, (D, D), computed by D vector-Jacobian products in ONE
backward pass: the K points are replicated D times and each replica gets one basis cotangent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_GROUP_SCALARS = 1 << 24  # replicas per backward pass are grouped to stay under this many
LOOP_POINTS = 16
"""A func that torch.func.vmap cannot batch is called point by point when a call has at most
this many points (the sequential solver's calls: one step's stages, times D for Jacobians)."""


class VectorField:
    """``func`` seen as a function of K points: (K,) times and (K, B, D) tensors -> (K, B, D).

    ``signature`` is ``"ode"`` for ``func(t, y)`` or ``"dae"`` for ``func(t, y, dy)``.
    """

    def __init__(self, func: Callable, batch: torch.Size, D: int, signature: str, name: str):
        self.func = func
        self.batch = tuple(batch)
        self.B = 1
        for s in self.batch:
            self.B *= s
        self.D = D
        self.signature = signature
        self.name = name
        self._vmapped = torch.func.vmap(func)
        self._loop = False

    def __call__(self, t: Tensor, *ys: Tensor) -> Tensor:
        """func at K points: t (K,), each y (K, B, D) -> (K, B, D)."""
        K = t.shape[0]
        user = [y.reshape(K, *self.batch, self.D) for y in ys]  # (K, *batch, D)
        if K == 1 or self._loop:
            out = torch.stack([self.func(t[k], *(u[k] for u in user)) for k in range(K)])
        else:
            try:
                out = self._vmapped(t, *user)
            except RuntimeError as e:
                if "vmap" not in str(e) and "Batched" not in str(e):
                    raise
                if K > LOOP_POINTS:
                    raise RuntimeError(
                        f"{self.name}: func is evaluated at {K} time points at once by "
                        f"torch.func.vmap, and it failed there. func must be written with "
                        f"torch operations only (no .item(), float(t), or Python branches on "
                        f"t or y) for the parallel solvers; solver='sequential' calls it a "
                        f"few points at a time, without vmap. vmap said: {e}") from e
                self._loop = True  # a few points: one plain call each, from now on
                out = torch.stack([self.func(t[k], *(u[k] for u in user)) for k in range(K)])
        return out.reshape(K, self.B, self.D)

    def with_jacobians(self, t: Tensor, *ys: Tensor) -> tuple[Tensor, list[Tensor]]:
        """func at K points and its Jacobian with respect to each y: out (K, B, D) and, per y,
        J (K, B, D, D) with J[k, b, i, j] = d out_i / d y_j (row by row)."""
        K, B, D = ys[0].shape
        group = max(1, min(D, _GROUP_SCALARS // max(1, 4 * K * B * D)))
        eye = torch.eye(D, dtype=ys[0].dtype, device=ys[0].device)
        out = None
        rows: list[list[Tensor]] = [[] for _ in ys]
        with torch.enable_grad():
            for i0 in range(0, D, group):
                g = min(group, D - i0)
                reps = [y.detach().repeat(g, 1, 1).requires_grad_(True) for y in ys]  # (gK, B, D)
                fr = self(t.detach().repeat(g), *reps)  # (g K, B, D)
                cot = eye[i0:i0 + g].reshape(g, 1, 1, D).expand(g, K, B, D).reshape(g * K, B, D)
                grads = torch.autograd.grad(fr, reps, cot, allow_unused=True)
                for j, gr in enumerate(grads):
                    if gr is None:
                        gr = torch.zeros_like(reps[j])
                    rows[j].append(gr.reshape(g, K, B, D))
                if out is None:
                    out = fr[:K].detach()
        # rows[j][i, k, b, :] = d out_i / d y_j at (k, b): stack i as the second-to-last dim
        jacs = [torch.cat(r).permute(1, 2, 0, 3) for r in rows]  # (K, B, D, D)
        assert out is not None
        return out, jacs

    def check_output(self, out: object, like: Tensor) -> None:
        """func's value at one point must be shaped, typed and placed like y0."""
        what = "func(t, y)" if self.signature == "ode" else "func(t, y, dy)"
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name}: {what} must return a tensor shaped like y0 "
                            f"{tuple(like.shape)}; got {type(out).__name__}")
        if out.shape != like.shape:
            raise ValueError(f"{self.name}: {what} must return a tensor shaped like y0, "
                             f"{tuple(like.shape)}; got shape {tuple(out.shape)}")
        if out.dtype != like.dtype or out.device != like.device:
            raise TypeError(f"{self.name}: {what} returned {out.dtype} on {out.device} for y0 "
                            f"of {like.dtype} on {like.device}; func must keep y's dtype and "
                            f"device")
