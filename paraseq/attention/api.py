"""``linear_attention``: input checks, feature maps, the normaliser, packed sequences, and the
choice of form.

Shape letters as in ``naive``; d the size of raw queries and keys, N_seq packed sequences.
Layout: (B, H, T, d) by default (torch's scaled_dot_product_attention's); ``layout="bthd"``
takes and returns fla's (B, T, H, d). States are (B, H, K, V) in both layouts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import chunked_triton
from .chunked import chunked_attention
from .chunked_triton import triton_attention
from .features import FEATURE_MAPS, NON_CAUSAL
from .naive import naive_attention, naive_linformer
from .parallel import parallel_attention
from .recurrent import recurrent_attention

FORMS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "naive": naive_attention,
    "parallel": parallel_attention,
    "recurrent": recurrent_attention,
    "chunked": chunked_attention,
    "triton": triton_attention,
}
LAYOUTS = ("bhtd", "bthd")
SIMILARITIES = (*FEATURE_MAPS, "linformer")


def choose_form(T: int, K: int, *, causal: bool, gate_over_k: bool, needs_grad: bool,
                device: torch.device, chunk_size: int = 64) -> str:
    """What ``form="auto"`` runs.

    One step (decoding) is the recurrent form. Not causal, the state form (``chunked``:
    q (k^T v), linear in T) unless T is small. Causal: the quadratic product while T is within
    a couple of chunks (one matmul beats bookkeeping; on a GPU up to 512 steps), else chunked.
    The recurrent loop is never picked for T > 1 when gradients are needed: autograd would keep
    one (K, V) state per step. A gate over K makes the quadratic form O(T^2 K): it stays short.
    Where the chunked form would run causally on a GPU, the Triton kernels of the same
    arithmetic run instead (``"triton"``) when triton is installed and K <= 256.
    """
    if T <= 1:
        return "recurrent"
    short = max(2 * chunk_size, 512 if device.type == "cuda" else 128)
    if gate_over_k:
        short = min(short, 32)
    if not causal:
        return "parallel" if T <= min(short, K) else "chunked"
    if T <= short:
        return "parallel"
    if not needs_grad and T <= 4:
        return "recurrent"
    if device.type == "cuda" and K <= chunked_triton.MAX_K and chunked_triton.available(device):
        return "triton"
    return "chunked"


_last = {"form": ""}


def last_form() -> str:
    """The form the latest ``linear_attention`` call in this process ran (``form="auto"``'s
    choice, or the form asked for): ``"parallel"``, ``"recurrent"``, ``"chunked"``,
    ``"triton"``, ``"naive"``, ``"linformer"``; ``""`` before the first call.
    ``paraseq.nn.LinearAttention.last_form`` holds the same for a module's latest forward."""
    return _last["form"]


def _bad(arg: str, got: object, need: str) -> ValueError:
    return ValueError(f"linear_attention: {arg} {need}; got {got}")


def _check_unit_interval(name: str, x: Tensor) -> None:
    if x.numel() and not bool(((x > 0) & (x <= 1)).all()):
        raise _bad(name, f"values in [{x.min().item():.3g}, {x.max().item():.3g}]",
                   "must lie in (0, 1] (a decay of the state: 1 keeps it, 0.9 forgets 10% "
                   "per step)")


def _check_cu_seqlens(cu: object, T: int, B: int, device: torch.device) -> Tensor:
    cu_t = torch.as_tensor(cu, device="cpu")
    if cu_t.dim() != 1 or cu_t.numel() < 2 or cu_t.dtype.is_floating_point:
        raise _bad("cu_seqlens", f"{tuple(cu_t.shape)} {cu_t.dtype}",
                   "must be a 1-D integer tensor [0, t_1, ..., T] of sequence boundaries")
    if B != 1:
        raise _bad("cu_seqlens", f"inputs with batch {B}",
                   "packs sequences along T: pass batch 1 (the packed sequences)")
    if cu_t[0] != 0 or cu_t[-1] != T:
        raise _bad("cu_seqlens", f"first {cu_t[0].item()}, last {cu_t[-1].item()}",
                   f"must start at 0 and end at T = {T}")
    if not bool((cu_t[1:] > cu_t[:-1]).all()):
        raise _bad("cu_seqlens", cu_t.tolist(), "must be strictly increasing (no empty "
                   "sequences)")
    return cu_t


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str | Callable[[Tensor], Tensor] = "elu1",
    normalize: bool | None = None,
    decay: float | Tensor | None = None,
    gate: Tensor | None = None,
    causal: bool = True,
    form: str = "auto",
    chunk_size: int = 64,
    initial_state: Tensor | None = None,
    return_state: bool = False,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    layout: str = "bhtd",
    scale: float | None = None,
    eps: float = 1e-6,
    projection: tuple[Tensor, Tensor] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Linear attention: o_i = sum_j sim(q_i, k_j) v_j [/ sum_j sim(q_i, k_j)], j <= i if causal,
    with sim(q, k) = phi(q) . phi(k), evaluated as a recurrence with a matrix state
    S_t = diag(g_t) S_(t-1) + phi(k_t) v_t^T in one of three equal forms.

    Args:
        q: queries, (B, H, T, d) (or (B, T, H, d) with ``layout="bthd"``).
        k: keys, shaped as q.
        v: values, (B, H, T, d_v) (or (B, T, H, d_v)).
        feature_map: ``"elu1"`` (elu + 1), ``"relu"``, ``"identity"`` (RetNet, GLA),
            ``"taylor"`` (sim = 1 + q_n . k_n, q, k L2-normalised), ``"softmax"`` (softmax of q
            over features, of k over the sequence; not causal), ``"linformer"`` (softmax
            attention over keys and values projected along the sequence by ``projection``;
            not causal), or a callable applied to q and k alike.
        normalize: divide by sum_j sim(q_i, k_j) (+ ``eps``). None: True for elu1, relu,
            taylor and callables; False for identity, softmax (its weights already sum to one)
            and linformer.
        decay: a scalar decay of the state in (0, 1] (RetNet), a float or one per head (H,).
            Causal only.
        gate: a data-dependent decay in (0, 1]: (B, H, T) one per head and step (Mamba-2),
            or (B, H, T, d) one per key feature (GLA); in the layout's order. Causal only.
        causal: each query sees only the keys up to its own step.
        form: ``"auto"`` (see ``choose_form``), ``"parallel"`` (the masked quadratic product),
            ``"recurrent"`` (the step loop), ``"chunked"`` (quadratic in chunks, a scan across
            them: O(T) memory), ``"triton"`` (the chunked form as Triton kernels, forward and
            backward: CUDA tensors, or CPU ones under triton's interpreter), or ``"naive"``
            (the float64 loop: the reference). ``last_form()`` says which ran.
        chunk_size: C of the chunked form.
        initial_state: (B, H, K, V') the state before step 1, K the feature size (d, or d + 1
            for taylor), V' = d_v, or d_v + 1 when normalising (the last column holds the
            normaliser's state sum phi(k)). With cu_seqlens, one per sequence: (N_seq, ...).
        return_state: also return the final state (same shape as initial_state).
        cu_seqlens: packed sequences of different lengths: with batch 1, the boundaries
            [0, t_1, ..., T] along T; each sequence starts from its own initial state.
        layout: ``"bhtd"`` (default) or ``"bthd"`` (fla's).
        scale: multiplies phi(q) (inside the softmax for linformer). None: 1 when
            normalising or for softmax, d^-1/2 otherwise.
        eps: added to the normaliser.
        projection: (E, F), each (R, T): Linformer's projections of K and V along the
            sequence (feature_map="linformer" only).

    Returns:
        o, shape and dtype of v; with return_state, (o, final state). float32 inputs compute
        in float32, float64 in float64, bfloat16 and float16 in float32 (then cast back).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"linear_attention: {name} must be a Tensor; got {type(x).__name__}")
        if x.dim() != 4 or not x.dtype.is_floating_point:
            raise _bad(name, f"shape {tuple(x.shape)} {x.dtype}",
                       "must be a 4-D floating tensor (B, H, T, d) (or (B, T, H, d) with "
                       "layout='bthd')")
    if layout not in LAYOUTS:
        raise _bad("layout", repr(layout), f"must be one of {LAYOUTS}")
    if q.shape != k.shape or v.shape[:-1] != q.shape[:-1]:
        raise _bad("q, k, v shapes", f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}",
                   "must agree: q and k the same shape, v the same but for its last dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise _bad("q, k, v dtypes", f"{q.dtype}, {k.dtype}, {v.dtype}", "must be equal")
    if not (callable(feature_map) or feature_map in SIMILARITIES):
        raise _bad("feature_map", repr(feature_map),
                   f"must be one of {SIMILARITIES} or a callable")
    named = feature_map if isinstance(feature_map, str) else None
    if named in NON_CAUSAL and causal:
        raise _bad("causal", True, f"must be False with feature_map={named!r}: it needs the "
                   "whole sequence at once (softmax over keys or a projection along T)")
    if form not in ("auto", *FORMS):
        raise _bad("form", repr(form), f"must be one of {('auto', *FORMS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise _bad("chunk_size", repr(chunk_size), "must be an int >= 1")
    if normalize is None:
        normalize = named not in ("identity", "softmax", "linformer")

    out_dtype = v.dtype
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if layout == "bthd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if gate is not None and isinstance(gate, Tensor):
            gate = gate.transpose(1, 2)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    B, H, T, d = q.shape

    if named == "linformer":
        if projection is None or len(projection) != 2:
            raise _bad("projection", type(projection).__name__,
                       "must be a pair (E, F) of (R, T) tensors for feature_map='linformer'")
        for name, P in zip(("projection[0]", "projection[1]"), projection, strict=True):
            if not isinstance(P, Tensor) or P.dim() != 2 or P.shape[1] != T:
                raise _bad(name, getattr(P, "shape", P), f"must be an (R, T = {T}) tensor")
        for name, x in (("decay", decay), ("gate", gate), ("initial_state", initial_state),
                        ("cu_seqlens", cu_seqlens)):
            if x is not None:
                raise _bad(name, "a value", "is not defined for feature_map='linformer'")
        if normalize or return_state:
            raise _bad("normalize/return_state", True, "do not apply to linformer (it is "
                       "softmax attention over R projected steps, no state)")
        sc = d ** -0.5 if scale is None else scale
        E, Fp = (P.to(cdt) for P in projection)
        if form == "naive":
            o = naive_linformer(q, k, v, E, Fp, sc)
        else:
            kp = torch.einsum("rt,bhtk->bhrk", E, k)  # (B, H, R, d)
            vp = torch.einsum("rt,bhtv->bhrv", Fp, v)  # (B, H, R, d_v)
            o = torch.softmax(q @ kp.transpose(-1, -2) * sc, dim=-1) @ vp  # (B, H, T, d_v)
        o = o.to(out_dtype)
        _last["form"] = "linformer"
        return o.transpose(1, 2) if layout == "bthd" else o
    if projection is not None:
        raise _bad("projection", "a value", "is only used with feature_map='linformer'")

    log_g = None
    if decay is not None or gate is not None:
        if not causal:
            raise _bad("decay/gate", "a value", "needs causal=True (a decay runs forward in "
                       "time)")
    if decay is not None:
        if isinstance(decay, numbers.Real) and not isinstance(decay, bool):
            if not 0 < decay <= 1:
                raise _bad("decay", decay, "must lie in (0, 1] (1 keeps the state, 0.9 forgets "
                           "10% per step)")
            log_g = torch.full((1, H, 1, 1), math.log(decay), dtype=cdt, device=q.device)
        elif isinstance(decay, Tensor) and decay.shape in ((H,), (1,), ()):
            _check_unit_interval("decay", decay)
            log_g = decay.to(cdt).log().reshape(-1)[None, :, None, None].expand(1, H, 1, 1)
        else:
            raise _bad("decay", getattr(decay, "shape", type(decay).__name__),
                       f"must be a float or a tensor of one decay per head ({H},)")
        log_g = log_g.expand(B, H, T, 1)
    K_feat = d + 1 if named == "taylor" else d
    if gate is not None:
        if not isinstance(gate, Tensor) or tuple(gate.shape) not in ((B, H, T), (B, H, T, d)):
            shape = tuple(getattr(gate, "shape", ()))
            lay = "(B, T, H[, d])" if layout == "bthd" else "(B, H, T[, d])"
            raise _bad("gate", shape, f"must be a tensor {lay}: one decay per head and step, "
                       f"or one per key feature")
        if gate.dim() == 4 and K_feat != d:
            raise _bad("gate", tuple(gate.shape), "must be one per head and step (B, H, T) "
                       "with feature_map='taylor' (its features are not the key's)")
        _check_unit_interval("gate", gate)
        lg = gate.to(cdt).log()
        lg = lg[..., None] if lg.dim() == 3 else lg  # (B, H, T, 1 or d)
        log_g = lg if log_g is None else log_g + lg
    d_v = v.shape[-1]
    V_state = d_v + 1 if normalize else d_v
    n_seq = 1
    cu = None
    if cu_seqlens is not None:
        cu = _check_cu_seqlens(cu_seqlens, T, B, q.device)
        n_seq = cu.numel() - 1
    if initial_state is not None:
        want = (n_seq if cu is not None else B, H, K_feat, V_state)
        if not isinstance(initial_state, Tensor) or tuple(initial_state.shape) != want:
            raise _bad("initial_state", tuple(getattr(initial_state, "shape", ())),
                       f"must be a tensor {want} (sequences, H, K, V{' + 1' if normalize else ''})")
        initial_state = initial_state.to(cdt)

    phi_q, phi_k = FEATURE_MAPS[named] if named is not None else (feature_map, feature_map)
    if scale is None:
        scale = 1.0 if normalize or named == "softmax" else K_feat ** -0.5
    gate_over_k = log_g is not None and log_g.shape[-1] > 1
    if form == "auto":
        needs_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, log_g, initial_state))
        seg_T = T if cu is None else int((cu[1:] - cu[:-1]).max())
        form = choose_form(seg_T, K_feat, causal=causal, gate_over_k=gate_over_k,
                           needs_grad=needs_grad, device=q.device, chunk_size=chunk_size)
    if form == "triton" and not chunked_triton.available(q.device):
        why = chunked_triton.why_not(q.device)
        raise _bad("form", "'triton'", f"'triton' cannot run here: {why}; or use form='auto' "
                   "or form='chunked' (the same arithmetic in torch)")
    fn = FORMS[form]
    kwargs = {"chunk_size": chunk_size} if form in ("chunked", "triton") else {}
    _last["form"] = form

    def attend(qs: Tensor, ks: Tensor, vs: Tensor, lgs: Tensor | None, S0: Tensor | None):
        fq, fk = phi_q(qs), phi_k(ks)  # (B, H, T, K)
        if scale != 1:
            fq = fq * scale
        if fq.shape != fk.shape or fq.shape[-1] != K_feat:
            raise _bad("feature_map", f"features {tuple(fq.shape)}, {tuple(fk.shape)}",
                       f"must map q and k to the same shape (..., {K_feat})")
        if normalize:  # the normaliser is one more value column: v_j -> [v_j, 1]
            vs = torch.cat([vs, torch.ones_like(vs[..., :1])], dim=-1)  # (B, H, T, V + 1)
        o, S = fn(fq, fk, vs, lgs, S0, causal, **kwargs)
        if normalize:
            o = o[..., :-1] / (o[..., -1:] + eps)
        return o, S

    if cu is None:
        o, S = attend(q, k, v, log_g, initial_state)
    else:
        outs, states = [], []
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            oi, Si = attend(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                            None if log_g is None else log_g[:, :, s:e],
                            None if initial_state is None else initial_state[i:i + 1])
            outs.append(oi)
            states.append(Si)
        o, S = torch.cat(outs, dim=2), torch.cat(states, dim=0)
    o = o.to(out_dtype)
    if layout == "bthd":
        o = o.transpose(1, 2)
    return (o, S.to(out_dtype)) if return_state else o
