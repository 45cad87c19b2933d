"""The linearisations: what each method uses for A_t in

    h_t^(k+1) = f(x_t, h_{t-1}^(k)) + A_t (h_{t-1}^(k+1) - h_{t-1}^(k)),

a linear recurrence in h^(k+1) solved by ``linear_scan``.

Shape letters: N rows (batch x time flattened), D state size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cell import FlatCell


@dataclass(frozen=True)
class Method:
    name: str
    structure: str  # "dense", "diagonal", "identity", "zero" or "loop"
    description: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("sequential", "loop", "the plain loop over time: the reference and the fallback"),
        Method("newton", "dense", "DEER: the full Jacobian, a dense scan per iteration"),
        Method("quasi_newton", "diagonal", "quasi-DEER: the Jacobian's diagonal, an elementwise "
                                           "scan per iteration"),
        Method("damped_newton", "dense", "Levenberg-Marquardt on the whole trajectory (ELK's "
                                         "idea): trust-region steps that shrink to Newton's"),
        Method("picard", "identity", "A = I: a cumulative sum per iteration"),
        Method("jacobi", "zero", "A = 0: h <- f(x, shift(h)), no scan"),
    )
}
"""Every method by name; ``"auto"`` picks one (see ``choose_method``)."""

JACOBIANS = ("auto", "analytic", "autograd", "compiled", "hutchinson")


def resolve_jacobian(method: Method, jacobian: str, fc: FlatCell) -> str | None:
    """The Jacobian source a method will use, or None for methods that need none."""
    if method.structure not in ("dense", "diagonal"):
        return None
    has = (fc.has_full or fc.has_blocks) if method.structure == "dense" else \
        (fc.has_diag or fc.has_full)
    if jacobian == "auto":
        return "analytic" if has else "autograd"
    if jacobian == "analytic" and not has:
        need = "forward_with_jacobian" if method.structure == "dense" else \
            "forward_with_jacobian_diagonal (or forward_with_jacobian)"
        raise ValueError(f"solve_recurrence: jacobian='analytic' needs a cell that defines "
                         f"{need}; {type(fc.cell).__name__} does not. Use jacobian='autograd'")
    if jacobian == "hutchinson" and method.structure == "dense":
        raise ValueError(f"solve_recurrence: jacobian='hutchinson' estimates a diagonal and "
                         f"only serves method='quasi_newton'; method={method.name!r} needs the "
                         f"full Jacobian ('auto', 'analytic' or 'autograd')")
    return jacobian


def linearise(fc: FlatCell, method: Method, source: str | None, x: Tensor, h: Tensor, *,
              samples: int = 8, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor | None]:
    """f(x, h) on all rows and the method's A: (N, D, D), (N, D), or None (identity / zero).
    A dense method gets the diagonal blocks (N, G, k, k) instead when the cell provides them
    (``forward_with_jacobian_blocks``): the same matrix, stored compactly."""
    return linearise_rhs(fc, method, source, x, h, samples=samples, generator=generator)[:2]


def linearise_rhs(fc: FlatCell, method: Method, source: str | None, x: Tensor, h: Tensor, *,
                  samples: int = 8, generator: torch.Generator | None = None
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``linearise``, plus the scan's right-hand side f - A h (N, D) where the compiled
    Jacobian computed it in the same pass (else None: the caller forms it)."""
    if source == "compiled" and method.structure in ("dense", "diagonal") and not (
            torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
        from . import jit  # (a graph to keep, grad="unrolled": autograd's path below)

        res = jit.call(fc, "lin", x, h)
        if res is not None:
            F, J, b = res
            if method.structure == "dense":
                return F, J, b
            d = torch.diagonal(J, dim1=-2, dim2=-1)
            return F, d, None
        source = "autograd"
    if method.structure == "dense":
        res = fc.analytic_blocks(x, h) if source == "analytic" else None
        if res is None and source == "analytic":
            res = fc.analytic_full(x, h)
        return (*(res if res is not None else fc.autograd_full(x, h)), None)
    if method.structure == "diagonal":
        if source == "hutchinson":
            return (*fc.hutchinson_diag(x, h, samples, generator), None)
        res = fc.analytic_diag(x, h) if source == "analytic" else None
        return (*(res if res is not None else fc.autograd_diag(x, h)), None)
    return fc(x, h), None, None


def evaluate_rows(fc: FlatCell, source: str | None, x: Tensor, h: Tensor) -> Tensor:
    """f(x, h) on all rows (N, D): compiled with the Jacobian's source "compiled"."""
    if source == "compiled" and not (torch.is_grad_enabled()
                                     and not torch.is_inference_mode_enabled()):
        from . import jit

        F = jit.call(fc, "f", x, h)
        if F is not None:
            return F
    return fc(x, h)
