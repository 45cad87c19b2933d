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
        self.vmap_error: str | None = None

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
                # func cannot be batched over time points (Python control flow on t or y,
                # .item(), float(t)): one plain call per point from now on
                self._loop = True
                self.vmap_error = str(e).splitlines()[0]
                out = torch.stack([self.func(t[k], *(u[k] for u in user)) for k in range(K)])
        return out.reshape(K, self.B, self.D)

    @property
    def vectorised(self) -> bool:
        """False once func has been found not to run under torch.func.vmap."""
        return not self._loop

    def probe(self, t0: Tensor, *ys: Tensor) -> bool:
        """Whether func runs batched over time points: two points through vmap, without
        gradients (t0 a 0-d time, each y (B, D)). Returns ``vectorised``."""
        if not self._loop:
            with torch.no_grad():
                self(t0.reshape(1).expand(2), *(y.reshape(1, self.B, self.D).expand(2, -1, -1)
                                                 for y in ys))
        return self.vectorised

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
                if fr.requires_grad:
                    grads = torch.autograd.grad(fr, reps, cot, allow_unused=True)
                else:  # func does not depend on y at all (a forcing term alone)
                    grads = (None,) * len(reps)
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
