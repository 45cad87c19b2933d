"""A user's cell seen as one function of flat tensors, and the Jacobian protocol.

Shape letters: N rows of a batched call (batch x time, flattened), n input size, D state size
(the sizes of all state tensors added up, for tuple states such as LSTM's (h, c)).

A cell follows torch's RNNCell convention, input first: ``cell(x, h) -> h_new`` with x (N, n)
and h (N, D), or h a tuple of (N, D_i) returning a tuple of the same shapes. Rows must be
independent (row i of the output depends on row i of x and h only), which every recurrent cell
satisfies; paraseq evaluates the cell once on all T time steps stacked into the rows.

The Jacobian protocol. A cell may provide analytic Jacobians with respect to its state by
defining either or both methods (paraseq.cells' built-in cells do):

    cell.forward_with_jacobian(x, h) -> (h_new, J)            J: (N, D, D), J[i, j] = dh_new_i/dh_j
    cell.forward_with_jacobian_diagonal(x, h) -> (h_new, d)   d: (N, D), the diagonal of J

For tuple states, D and the indices refer to the concatenation of the tuple's tensors in order.
A cell whose Jacobian is block diagonal after grouping its state (paraseq.cells'
DiagLSTMCell: unit i of h and unit i of c form a 2 x 2 block) may also define

    cell.forward_with_jacobian_blocks(x, h) -> (h_new, Jb)     Jb: (N, G, k, k)

with D = k G and block g coupling the state entries g, G + g, ..., (k - 1) G + g (for
a tuple state of k tensors of G features each: entry g of every tensor); entries in different
blocks do not interact. Newton then scans G independent k x k recurrences: exact at O(T G k^3)
instead of O(T D^3). The dense Jacobian must still be available (``forward_with_jacobian``)
for damped_newton.
A cell whose Jacobian is diagonal (each unit reads only its own past: paraseq.cells'
DiagGRUCell) says so with the attribute ``jacobian_is_diagonal = True``; then the diagonal is
the whole Jacobian, "auto" picks quasi_newton (which is exact Newton for it) and the implicit
gradient's adjoint runs an elementwise scan instead of a dense one.
A method that cannot serve a call (a cell wrapping another, say) may return ``NotImplemented``,
and paraseq falls back to torch.func. Results must equal autograd's; the tests of paraseq.cells
hold every built-in cell to that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

State = Tensor | tuple[Tensor, ...]

FUNC_CHUNK = 1 << 22
"""Scalars (rows x D x (D + n)) per chunk of ``FlatCell.func_full``'s rows."""
FUNC_MIN_WORK = 1 << 19
"""``autograd_full`` takes torch.func's forward mode from N D^2 >= this on: below, the VJP
path's lower fixed cost per call wins (measured with the seed essay's cell in float64: a
2 x 500 x 4 solve 1.7x slower by torch.func, 4 x 2000 x 8 even, 16 x 1000 x 8 2x faster)."""


@dataclass(frozen=True)
class StateLayout:
    """How a state (a tensor or a tuple of tensors) maps to one flat (..., D) tensor."""

    sizes: tuple[int, ...]
    is_tuple: bool

    @property
    def D(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(state: State, what: str = "h0") -> StateLayout:
        if isinstance(state, Tensor):
            if state.dim() < 1:
                raise ValueError(f"solve_recurrence: {what} must have a feature dim (..., D); got "
                                 f"a 0-d tensor")
            return StateLayout((state.shape[-1],), False)
        if isinstance(state, (tuple, list)) and state and all(isinstance(s, Tensor) for s in state):
            if any(s.dim() < 1 for s in state):
                raise ValueError(f"solve_recurrence: every tensor of {what} needs a feature dim")
            return StateLayout(tuple(s.shape[-1] for s in state), True)
        raise TypeError(f"solve_recurrence: {what} must be a tensor or a tuple of tensors; got "
                        f"{type(state).__name__}")

    def flatten(self, state: State) -> Tensor:
        if not self.is_tuple:
            return state  # type: ignore[return-value]
        batch = torch.broadcast_shapes(*(s.shape[:-1] for s in state))
        return torch.cat([s.expand(*batch, s.shape[-1]) for s in state], dim=-1)

    def unflatten(self, flat: Tensor) -> State:
        if not self.is_tuple:
            return flat
        return tuple(torch.split(flat, list(self.sizes), dim=-1))

    def check_output(self, out: object, rows: int, dtype: torch.dtype) -> None:
        """The cell's output must have the state's structure and shapes."""
        expect = (f"a tuple of {len(self.sizes)} tensors of shapes "
                  + ", ".join(f"({rows}, {d})" for d in self.sizes)) if self.is_tuple \
            else f"a tensor of shape ({rows}, {self.sizes[0]})"
        if self.is_tuple:
            ok = (isinstance(out, (tuple, list)) and len(out) == len(self.sizes)
                  and all(isinstance(o, Tensor) and tuple(o.shape) == (rows, d)
                          for o, d in zip(out, self.sizes, strict=False)))
        else:
            ok = isinstance(out, Tensor) and tuple(out.shape) == (rows, self.sizes[0])
        if not ok:
            got = (type(out).__name__ + " of shapes "
                   + ", ".join(str(tuple(o.shape)) if isinstance(o, Tensor) else type(o).__name__
                               for o in out)) if isinstance(out, (tuple, list)) else (
                f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor)
                else type(out).__name__)
            raise ValueError(f"solve_recurrence: cell(x, h) must return the state's structure, "
                             f"{expect}; got {got}")
        outs = out if self.is_tuple else (out,)
        for o in outs:  # type: ignore[union-attr]
            if o.dtype != dtype:
                raise TypeError(f"solve_recurrence: cell(x, h) returned dtype {o.dtype} for a "
                                f"state of dtype {dtype}; the cell must keep the state's dtype")


def _versions(x: Tensor, h: Tensor) -> tuple[int, int]:
    """The version counters of x and h (torch bumps them on every in-place write; inference
    tensors have none)."""
    return (0 if x.is_inference() else x._version, 0 if h.is_inference() else h._version)


def in_place_message(cell: Callable) -> str:
    name = getattr(cell, "__qualname__", None) or type(cell).__name__
    return (f"solve_recurrence: the cell {name} modified its input x or state h in place "
            f"(an in-place op such as h.mul_(...), h += ..., or h[...] = ...); paraseq evaluates "
            f"the cell on every time step at once, keeps its arguments and differentiates it, so "
            f"the cell must return a new tensor and leave x and h as they are: write "
            f"h = h * ... or h = h + ... instead")


class FlatCell:
    """``f(x, h_flat) -> h_new_flat`` over rows, with Jacobians by protocol or torch.func."""

    def __init__(self, cell: Callable, layout: StateLayout):
        self.cell = cell
        self.layout = layout
        self.checked = False
        self.has_full = callable(getattr(cell, "forward_with_jacobian", None))
        self.has_diag = callable(getattr(cell, "forward_with_jacobian_diagonal", None))
        self.diag_exact = getattr(cell, "jacobian_is_diagonal", False) is True
        self.has_blocks = callable(getattr(cell, "forward_with_jacobian_blocks", None))
        self.func_ok: bool | None = None  # torch.func traces the cell (None: not tried yet)
        self.func_min_work = FUNC_MIN_WORK

    def __call__(self, x: Tensor, h: Tensor) -> Tensor:  # (N, n), (N, D) -> (N, D)
        versions = _versions(x, h)
        try:
            out = self.cell(x, self.layout.unflatten(h))
        except RuntimeError as err:  # autograd refuses in-place writes to a leaf it tracks
            if "in-place operation" in str(err) and "leaf" in str(err):
                raise ValueError(in_place_message(self.cell)) from err
            raise
        if versions != _versions(x, h):
            raise ValueError(in_place_message(self.cell))
        if not self.checked:
            self.layout.check_output(out, h.shape[0], h.dtype)
            self.checked = True
        return self.layout.flatten(tuple(out) if self.layout.is_tuple else out)

    # -- Jacobians with respect to the state: J[n, i, j] = d f_i / d h_j at row n ----------

    def analytic_full(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
        if not self.has_full:
            return None
        res = self.cell.forward_with_jacobian(x, self.layout.unflatten(h))
        if res is NotImplemented:
            return None
        out, J = res
        return self.layout.flatten(tuple(out) if self.layout.is_tuple else out), J

    def analytic_blocks(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
        """f and the Jacobian's diagonal blocks (N, G, k, k), or None."""
        if not self.has_blocks:
            return None
        res = self.cell.forward_with_jacobian_blocks(x, self.layout.unflatten(h))
        if res is NotImplemented:
            return None
        out, Jb = res
        return self.layout.flatten(tuple(out) if self.layout.is_tuple else out), Jb

    def analytic_diag(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
        if self.has_diag:
            res = self.cell.forward_with_jacobian_diagonal(x, self.layout.unflatten(h))
            if res is not NotImplemented:
                out, d = res
                return self.layout.flatten(tuple(out) if self.layout.is_tuple else out), d
        full = self.analytic_full(x, h)
        if full is None:
            return None
        return full[0], torch.diagonal(full[1], dim1=-2, dim2=-1)

    def _vjp_rows(self, x: Tensor, h: Tensor, cotangents: Tensor) -> tuple[Tensor, Tensor]:
        """f(x, h) and the VJPs of K stacked cotangents (K, N, D) -> (K, N, D).

        The rows are independent, so K VJPs are one backward pass of the cell on the rows
        replicated K times, each replica with its own cotangent: plain autograd with a wider
        batch, which on CPU beats torch.func.vmap over the cotangents. Replicas are processed
        in groups that keep the widened batch under about 2^24 scalars. Under an enclosing
        autograd graph (grad="unrolled") the result stays differentiable.
        """
        K, N, D = cotangents.shape
        # with grad enabled (grad="unrolled", or a backward building a graph) the result keeps
        # its graph to x, h and whatever the cell reads: its parameters, closed-over tensors
        differentiable = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if torch.is_inference_mode_enabled():  # autograd needs normal tensors: copies of them
            with torch.inference_mode(False):
                return self._vjp_rows(x.clone(), h.clone(), cotangents.clone())
        group = max(1, min(K, (1 << 24) // max(1, N * (D + x.shape[-1]))))
        out, rows = None, []
        with torch.enable_grad():
            for k0 in range(0, K, group):
                k = min(group, K - k0)
                hr = h.repeat(k, 1) if differentiable else h.detach().repeat(k, 1)
                if not hr.requires_grad:
                    hr.requires_grad_(True)
                fr = self(x.repeat(k, 1), hr)  # (k N, D)
                (g,) = torch.autograd.grad(fr, hr, cotangents[k0:k0 + k].reshape(k * N, D),
                                           create_graph=differentiable)
                rows.append(g.reshape(k, N, D))
                if out is None:
                    out = fr[:N] if differentiable else fr[:N].detach()
        return out, torch.cat(rows) if len(rows) > 1 else rows[0]

    def row(self, x: Tensor, h: Tensor) -> Tensor:
        """f on one row, x (n,), h (D,) -> (D,): the cell called on a batch of one, for
        torch.func's transforms (vmap over the rows)."""
        out = self.cell(x.unsqueeze(0), self.layout.unflatten(h.unsqueeze(0)))
        return self.layout.flatten(tuple(out) if self.layout.is_tuple else out).squeeze(0)

    def func_full(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
        """f and J (N, D, D) by forward-mode torch.func: ``vmap(jacfwd(row))`` over the rows,
        in row chunks that keep the intermediates near ``FUNC_CHUNK`` scalars. None where
        torch.func cannot trace the cell (in-place ops, data-dependent control flow, random
        ops, ...): the caller then takes the VJP path, which also gives those cells' errors.

        Forward mode suits a cell whose state enters through linear layers: the tangents of
        h @ W^T for the D basis vectors are W's columns, the same for every row, so the work
        per row is the elementwise chain rule, about what an analytic Jacobian costs."""
        if self.func_ok is False:
            return None
        if not self.checked:  # the output checks and the in-place test, on two rows
            self(x[:2], h[:2])
        N, D = h.shape
        step = max(1, FUNC_CHUNK // max(1, D * (D + x.shape[-1])))

        def with_aux(xr: Tensor, hr: Tensor) -> tuple[Tensor, Tensor]:
            out = self.row(xr, hr)
            return out, out

        jac = torch.func.vmap(torch.func.jacfwd(with_aux, argnums=1, has_aux=True))
        Fs, Js = [], []
        try:
            for s in range(0, N, step):
                with torch.no_grad():
                    J, F = jac(x[s:s + step], h[s:s + step])
                Fs.append(F)
                Js.append(J)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError,
                IndexError):
            self.func_ok = False
            return None
        if self.func_ok is None:  # once: rows evaluated one by one equal the batched call?
            # a cell that mixes rows (batch statistics) differs: its Jacobian is not
            # torch.func's per-row one, and the VJP path (and the contract probe) take it
            rows = min(N, step)
            with torch.no_grad():
                whole = self(x[:rows], h[:rows])
            tol = max(torch.finfo(whole.dtype).eps ** 0.5, 1e-12)
            close = ((Fs[0] - whole).abs() <= tol * (1 + whole.abs())) | (
                Fs[0].isnan() & whole.isnan())
            if not bool(close.all()):
                self.func_ok = False
                return None
        self.func_ok = True
        if len(Fs) == 1:
            return Fs[0], Js[0]
        return torch.cat(Fs), torch.cat(Js)

    def autograd_full(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """f and J (N, D, D) by automatic differentiation: torch.func's forward mode where it
        serves (``func_full``: no graph kept, the cell traceable), else D vector-Jacobian
        products by plain autograd (a graph kept under grad="unrolled")."""
        N, D = h.shape
        if N * D * D >= max(1, self.func_min_work) and not (
                torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
            if torch.is_inference_mode_enabled():  # torch.func needs normal tensors
                with torch.inference_mode(False):
                    res = self.func_full(x.clone(), h.clone())
            else:
                res = self.func_full(x, h)
            if res is not None:
                return res
        basis = torch.eye(D, dtype=h.dtype, device=h.device).unsqueeze(1).expand(D, N, D)
        out, rows = self._vjp_rows(x, h, basis)  # rows[i, n, :] = J[n, i, :]
        return out, rows.permute(1, 0, 2)  # (N, D, D)

    def autograd_diag(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        out, J = self.autograd_full(x, h)
        return out, torch.diagonal(J, dim1=-2, dim2=-1)

    def hutchinson_diag(self, x: Tensor, h: Tensor, samples: int,
                        generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Unbiased estimate E[v * (J^T v)] of diag(J) with Rademacher probes v."""
        N, D = h.shape
        v = torch.randint(0, 2, (samples, N, D), generator=generator, device="cpu")
        v = (2 * v - 1).to(dtype=h.dtype, device=h.device)  # (K, N, D)
        out, rows = self._vjp_rows(x, h, v)
        return out, (v * rows).mean(0)


def blocks_to_dense(Jb: Tensor) -> Tensor:
    """The dense (..., D, D) Jacobian from diagonal blocks (..., G, k, k), D = k G, block g on
    the entries g, G + g, ..., (k - 1) G + g."""
    G, k = Jb.shape[-3], Jb.shape[-1]
    # J[s G + g, r G + g] = Jb[g, s, r]: diagonal (G, G) matrices per (s, r)
    diag = torch.diag_embed(Jb.movedim(-3, -1))  # (..., k, k, G, G)
    return diag.transpose(-3, -2).reshape(*Jb.shape[:-3], k * G, k * G)
