"""``solve_recurrence``: h_t = cell(x_t, h_{t-1}) for t = 1..T, in parallel over T.

Shape letters: ``...`` the caller's batch dims, B their product, T time, n input size,
D state size (summed over the tensors of a tuple state).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _heap
from .._compile import eager
from ..result import ConvergenceError, SolveInfo
from .cell import FlatCell, State, StateLayout
from .implicit import (
    POLISH_MAX_D,
    _Adjoint,
    _anchors,
    _held_tensors,
    _Implicit,
    _polish,
    _Switch,
)
from .iterate import (
    LoopResult,
    _eval,
    evaluate,
    first_failure,
    residual_map,
    residual_max,
    run,
    sequential,
    shift,
)
from .methods import JACOBIANS, METHODS, Method, resolve_jacobian

ON_FAILURE = ("fallback", "raise", "warn")
GRADS = ("implicit", "unrolled")

DENSE_MEMORY_LIMIT = 1 << 30
"""Bytes the dense Jacobians of one solve may take (newton, damped_newton and the implicit
backward of every method). Longer problems are solved in consecutive time chunks, each chunk
starting from the state the previous one ended in; the result is the same, with less
parallelism. Change it with ``paraseq.solve.api.DENSE_MEMORY_LIMIT = ...``."""

DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2,
               torch.float16: 2e-3}
"""Default tolerance on the scaled residual max |h_t - f(x_t, h_{t-1})| / (1 + |f|), by the
dtype of the inputs: about 1e5 float64 ulps, 1e2 float32 ulps, a few bfloat16/float16 ulps."""

DEFAULT_MAX_ITER = {"newton": 50, "damped_newton": 100, "quasi_newton": 200, "picard": 200,
                    "jacobi": 200}
"""Default iteration caps (never more than T, which suffices for newton and jacobi)."""

_RESTARTS = 3


_CPU_PARALLEL_WORK = {"autograd": 256, "analytic": 2048, "diagonal": 4096, "probe": 4096}
_CPU_TRAINING_FACTOR = 8


def choose_method(T: int, B: int, D: int, fc: FlatCell, device: torch.device,
                  training: bool = False, training_factor: float = _CPU_TRAINING_FACTOR) -> str:
    """The rule behind ``method="auto"``.

    - T <= 64: ``"sequential"``: a few dozen steps cost less than a few Newton iterations.
    - On a CPU, a Newton iteration costs about B T D^2 units of Jacobian work (autograd: D
      backward passes over the B T rows; analytic: about 8x less), while the loop costs a fixed
      overhead of some 30 microseconds per step however small B and D are. So the parallel
      path pays while B D^2 is small: ``"newton"`` if B D^2 <= 256 (2048 with an analytic
      Jacobian), and anything larger runs ``"sequential"``. When a backward pass will follow
      (``training``: grad mode on and the inputs, h0 or the cell's parameters require grad)
      the bound is 8x higher: the parallel path's backward is one adjoint scan, while autograd
      through the loop costs 5x to 30x its forward (benchmarks/solve.py: B = 16, D = 8,
      T = 1e4 trains 3.7x faster by Newton than by the loop). A cell with only an analytic
      diagonal, or D = 1 (where the diagonal is the Jacobian), gets ``"quasi_newton"``, whose
      elementwise scan is cheaper than a dense one. Measured on this project's 2-core CPU
      with torch.nn.GRUCell, T = 1e4..1e5 (README, benchmarks/solve.py): B = 1, D = 8 is 4x
      faster than the loop by Newton; B = 16, D = 8 is 4x slower. ``training_factor``
      replaces the 8 where the sequential path is a fused kernel whose backward costs only
      about twice its forward (paraseq.nn's torch.nn kernels: 2).
    - A user's cell on a CPU (no analytic Jacobian) with T >= ``PROBE_MIN_T`` (2048) and
      B D^2 <= 4096, not training: the bound above is replaced by a measurement of the cell
      and its Jacobian on this problem (``probe_method``), since cells differ too much in
      cost for one bound (the seed essay's cell is 2x to 4x slower by Newton than by the loop
      at B D^2 = 256 to 1024, a hand-written GRU 2x faster at 256; benchmarks/any_cell.py).
    - A cell with ``jacobian_is_diagonal = True`` gets ``"quasi_newton"``, which is exact Newton
      for it at O(B T D) per iteration, and one with ``forward_with_jacobian_blocks`` gets
      ``"newton"`` on its k x k blocks (O(B T D k^2)); on a CPU while B D <= 4096 (x8 when
      training), beyond which the loop's fixed per-step overhead is the smaller cost.
    - Other devices (CUDA): ``"newton"`` for 1 < D <= 64 (or an analytic full Jacobian), else
      ``"quasi_newton"``: the device is wide, and the loop's per-step launch overhead is what
      the parallel methods remove.
    """
    if T <= 64:
        return "sequential"
    if fc.diag_exact or fc.has_blocks:
        if device.type == "cpu" and B * D > _CPU_PARALLEL_WORK["diagonal"] * (
                training_factor if training else 1):
            return "sequential"
        return "quasi_newton" if fc.diag_exact else "newton"
    diag_only = fc.has_diag and not fc.has_full
    if device.type == "cpu":
        limit = _CPU_PARALLEL_WORK["analytic" if (fc.has_full or fc.has_diag) else "autograd"]
        if B * D * D > limit * (training_factor if training else 1):
            return "sequential"
        return "quasi_newton" if (diag_only or D == 1) else "newton"
    if D == 1 or diag_only or (D > 64 and not fc.has_full):
        return "quasi_newton"
    return "newton"


PROBE_MIN_T = 2048
"""``method="auto"`` times a user's cell (``probe_method``) from this length on."""
PROBE_ITERATIONS = 4.0
"""The parallel solve's cost in units of one linearisation and scan of all B T rows: about
three Newton iterations and the evaluations around them (the issue-16 workloads converge in
three; benchmarks/any_cell.py)."""
PROBE_MARGIN = 0.8
"""The parallel method is taken when its predicted time is under this fraction of the loop's."""


def probe_method(fc: FlatCell, X: Tensor, h0: Tensor, cell_dtype: torch.dtype,
                 jacobian: str = "auto") -> str:
    """The rule of ``method="auto"`` for a user's cell on a CPU (no analytic Jacobian, not
    training, T >= ``PROBE_MIN_T``, B D^2 <= 4096): measured, not guessed. The cost of a cell
    and of its torch.func Jacobian differ by orders of magnitude between cells (the seed
    essay's tanh(A h + u) is one matmul; a hand-written GRU is a dozen ops), so one bound on
    B D^2 (``choose_method``) cannot hold for all. The probe times the loop on 64 steps (best
    of 2) and one linearisation plus scan on prefixes of k and 8 k steps (B k >= 1024 rows,
    best of 2 after a warm-up), fits a fixed cost plus a cost per row to those, and predicts
    the loop at T steps and the parallel solve at ``PROBE_ITERATIONS`` such passes over the
    B T rows (measured once per cell and (B, D, n, dtype, device), then reused for every
    length); ``"newton"``
    (``"quasi_newton"`` for D = 1) when that is under ``PROBE_MARGIN`` of the loop, else
    ``"sequential"``. It costs a few milliseconds, and its pick can differ between calls
    near the break-even point, where the two are equally fast; the results are the same to
    the tolerance either way."""
    B, n = X.shape[0], X.shape[-1]
    D = h0.shape[-1]
    name = "quasi_newton" if D == 1 else "newton"
    m = METHODS[name]
    source = resolve_jacobian(m, "compiled" if jacobian == "compiled" else "autograd", fc)
    key = (B, D, n, X.dtype, X.device, source)
    try:
        known = _PROBED.setdefault(fc.cell, {})
    except TypeError:  # a cell that cannot be weakly referenced: probed every time
        known = {}
    if key not in known:
        saved = fc.func_min_work  # the Jacobians the whole solve would take, on the prefix
        if X.shape[0] * X.shape[1] * D * D >= saved:
            fc.func_min_work = 0
        try:
            known[key] = _probe_costs(fc, m, source, X, h0, cell_dtype)
        finally:
            fc.func_min_work = saved
    fixed, per_row, per_step_loop = known[key]
    T = X.shape[1]
    parallel = PROBE_ITERATIONS * (fixed + per_row * B * T)
    return name if parallel <= PROBE_MARGIN * per_step_loop * T else "sequential"


_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``probe_method``'s measurements, per cell and (B, D, n, dtype, device, Jacobian source):
one linearisation and scan as seconds fixed + seconds per row, and the loop's seconds per
step."""


def _probe_costs(fc: FlatCell, m: Method, source: str | None, X: Tensor, h0: Tensor,
                 cell_dtype: torch.dtype) -> tuple[float, float]:
    import time

    from .iterate import _lin_rhs, newton_step

    B, T, _ = X.shape
    D = h0.shape[-1]
    k1 = min(T, max(32, -(-1024 // B)))
    k2 = min(T, 8 * k1)

    def best(fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        def parallel(k: int) -> None:
            Hp = h0.unsqueeze(1).expand(B, k, D).contiguous()  # (B, k, D)
            F, A, b = _lin_rhs(fc, m, source, X[:, :k], Hp, cell_dtype, 8, None)
            newton_step(m, F, A, Hp, h0, b)

        parallel(k1)  # warm-up: torch.func's first trace (or the compilation)
        t1 = best(lambda: parallel(k1), 2)
        t2 = best(lambda: parallel(k2), 2) if k2 > k1 else t1
        steps = min(T, 64)  # the loop itself (slicing, the cell, the stack), some steps
        t_loop = best(lambda: sequential(fc, X[:, :steps], h0, cell_dtype), 2)
    # a pass costs a fixed part (dispatch, torch.func's tracing) and a part per row: the two
    # prefixes give both, and the solve's B T rows are predicted from them (one prefix of
    # 1024 rows alone made the fixed part look per-row: at D = 1, B = 16, T = 1e5 the loop
    # was picked, 20x slower than Newton)
    # (never under half the larger prefix's average: timing noise must not make rows free)
    per_row = max(t2 - t1, 0.0) / (B * (k2 - k1)) if k2 > k1 else t1 / (B * k1)
    per_row = max(per_row, 0.5 * t2 / (B * k2))
    fixed = max(t1 - per_row * B * k1, 0.0)
    return fixed, per_row, t_loop / steps


def _cell_state_sizes(cell: Callable) -> int | tuple[int, ...] | None:
    """The state sizes a cell declares: ``state_sizes`` (tuple), LSTMCell's (h, c), or
    ``hidden_size`` (int); None when it declares none."""
    sizes = getattr(cell, "state_sizes", None)
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    if isinstance(cell, torch.nn.LSTMCell):
        return (cell.hidden_size, cell.hidden_size)
    size = getattr(cell, "hidden_size", None)
    return size if isinstance(size, int) else None


def _default_state(cell: Callable, batch: torch.Size, like: Tensor) -> State:
    sizes = _cell_state_sizes(cell)
    if sizes is None:
        raise ValueError(f"solve_recurrence: h0=None needs a cell with a 'hidden_size' (int) or "
                         f"'state_sizes' (tuple) attribute to size the zero state; "
                         f"{type(cell).__name__} has neither. Pass h0 of shape (..., D)")
    if isinstance(sizes, int):
        return like.new_zeros(*batch, sizes)
    return tuple(like.new_zeros(*batch, int(s)) for s in sizes)


def _check_state_against_cell(cell: Callable, layout: StateLayout) -> None:
    sizes = _cell_state_sizes(cell)
    if sizes is None:
        return
    want = (sizes,) if isinstance(sizes, int) else sizes
    is_tuple = not isinstance(sizes, int)
    if tuple(want) != layout.sizes or is_tuple != layout.is_tuple:
        got = f"a tuple with feature sizes {layout.sizes}" if layout.is_tuple else \
            f"a tensor with feature size {layout.sizes[0]}"
        need = f"a tuple with feature sizes {tuple(want)}" if is_tuple else \
            f"a tensor of shape (..., {want[0]})"
        raise ValueError(f"solve_recurrence: h0 must be {need} for {type(cell).__name__}; "
                         f"got {got}")


def _state_parts(state: State, layout: StateLayout) -> tuple[Tensor, ...]:
    return tuple(state) if layout.is_tuple else (state,)  # type: ignore[arg-type]


COMPILED_CELLS = True
"""paraseq's own cells take the compiled kernels where they serve (see ``solve_recurrence``);
False sends them through the general loop (their analytic Jacobians and the scans) too."""


def _compiled_route(cell, method: str, name: str, X: Tensor, grad: str, init,
                    jacobian: str) -> str | None:
    """"loop" or "sweeps" where paraseq's own cells take the compiled kernels (see
    ``solve_recurrence``), else None."""
    from ..cells import compiled, modules

    if not COMPILED_CELLS:
        return None

    kinds = {modules.ElmanCell: "elman", modules.GRUCell: "gru", modules.LSTMCell: "lstm",
             modules.DiagGRUCell: "gru", modules.DiagLSTMCell: "lstm"}
    if type(cell) not in kinds or grad != "implicit" or not compiled.supported(X) \
            or X.shape[0] == 0:
        return None
    if any(p.dtype != X.dtype or p.device != X.device for p in cell.parameters()):
        return None
    if method in ("auto", "sequential"):
        return "loop"
    if (name == "newton" and init is None and jacobian in ("auto", "analytic")
            and not getattr(cell, "_diagonal", False)):
        return "sweeps"
    return None


def _fused_route(cell, method: str, X: Tensor, grad: str, init, jacobian: str,
                 name: str = "newton") -> bool:
    """Whether paraseq.gpu's fused Newton serves this solve, on a device of
    ``paraseq.gpu.routing.DEVICES`` (CUDA) with implicit gradients, no init and analytic
    Jacobians: DiagGRUCell/DiagLSTMCell (exactly those types) with method "auto", "newton" or
    "quasi_newton"; GRUCell/ElmanCell/LSTMCell with Newton (``method`` "newton", or "auto"
    whose choice ``name`` is Newton) and a state that fits the dense kernels (D <= 64)."""
    from ..cells import modules
    from ..gpu import routing

    if not routing.serves(X) or grad != "implicit" or init is not None \
            or jacobian not in ("auto", "analytic") or X.shape[0] == 0:
        return False
    if type(cell) in (modules.DiagGRUCell, modules.DiagLSTMCell):
        if method not in ("auto", "newton", "quasi_newton"):
            return False
    elif _dense_mode_of(cell) is not None:
        if routing.dense_route(_dense_mode_of(cell), cell.hidden_size,
                               name if method == "auto" else method)[0] is None:
            return False
    else:
        return False
    return all(p.device == X.device for p in cell.parameters())


def _dense_mode_of(cell) -> str | None:
    """paraseq.nn's mode of a dense built-in cell (exactly GRUCell, LSTMCell, ElmanCell), or
    None."""
    from ..cells import modules

    if type(cell) is modules.GRUCell:
        return "GRU"
    if type(cell) is modules.LSTMCell:
        return "LSTM"
    if type(cell) is modules.ElmanCell:
        return "RNN_TANH" if cell.nonlinearity == "tanh" else "RNN_RELU"
    return None


def _run_fused(cell, X: Tensor, h0: Tensor, layout: StateLayout, tol: float,
               max_iter: int | None, on_failure: str) -> tuple[Tensor, SolveInfo]:
    """The fused Newton of ``paraseq.gpu`` for DiagGRUCell/DiagLSTMCell and, dense, for
    GRUCell/ElmanCell/LSTMCell: (H (B, T, D), info)."""
    import torch.nn.functional as F

    from ..gpu import newton as gpu_newton

    Hs = cell.hidden_size
    lstm = layout.is_tuple
    gi = F.linear(X, cell.weight_ih, cell.bias_ih)  # (B, T, K H)
    h, c = (h0[:, :Hs], h0[:, Hs:]) if lstm else (h0, None)
    if _dense_mode_of(cell) is not None:  # the dense kernel: its state is [h, c], the layout's
        from ..gpu import dense, routing

        kind = routing.MODE_CELLS[_dense_mode_of(cell)]
        return dense.dense_flat(kind, gi, h0, cell.weight_hh, cell.bias_hh, tol=tol,
                                max_iter=max_iter, on_failure=on_failure)
    states, info = gpu_newton.diag_newton("lstm" if lstm else "gru", gi, h, cell.weight_hh,
                                          cell.bias_hh, c, tol=tol, max_iter=max_iter,
                                          on_failure=on_failure)
    H = torch.cat(states, dim=-1) if lstm else states  # (B, T, D)
    return H, info


_COMPILED_PARAMS = ("weight_ih", "bias_ih", "weight_hh", "bias_hh")


def _run_compiled(cell, route: str, X: Tensor, h0: Tensor, layout: StateLayout, tol: float,
                  max_iter: int | None, on_failure: str) -> tuple[Tensor, SolveInfo | None]:
    """The compiled loop or Newton sweeps for one of paraseq's cells: (H (B, T, D), the
    sweeps' SolveInfo or None for the loop).

    Their backward (a numba adjoint) is once-differentiable, so where a gradient may be asked
    for the kernels run inside ``paraseq.nn._twice.twice``: a plain backward is theirs, and a
    backward that builds a graph (create_graph=True) replays the solve by the general path
    (``_compiled_replay``), exact to second order."""
    params = tuple(getattr(cell, k) for k in _COMPILED_PARAMS)
    present = [p for p in params if p is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (X, h0, *present))):
        return _compiled_kernels(cell, route, X, h0, layout, tol, max_iter, on_failure, params)
    from ..nn._twice import twice

    box: dict = {}

    def run(X, h0, *ps):
        H, box["info"] = _compiled_kernels(cell, route, X, h0, layout, tol, max_iter,
                                           on_failure, _fill(params, ps))
        return (H,)

    def replay(X, h0, *ps):
        return (_compiled_replay(cell, route, X, h0, layout, tol, max_iter, on_failure,
                                 _fill(params, ps)),)

    (H,) = twice(run, replay, X, h0, *present)
    return H, box["info"]


def _fill(params: tuple, given: tuple) -> tuple:
    """``params`` with its tensors replaced, in order, by ``given`` (None stays None)."""
    it = iter(given)
    return tuple(None if p is None else next(it) for p in params)


def _compiled_replay(cell, route: str, X: Tensor, h0: Tensor, layout: StateLayout, tol: float,
                     max_iter: int | None, on_failure: str, params: tuple) -> Tensor:
    """The compiled route's solve by the general path, on ``params`` in place of the cell's
    own (torch.func.functional_call): the loop for the compiled loop, Newton for the sweeps."""
    names = dict(zip(_COMPILED_PARAMS, params, strict=True))
    tensors = {k: v for k, v in names.items() if v is not None}

    def step(x, h):
        return torch.func.functional_call(cell, tensors, (x, h))

    states = solve_recurrence(step, X, layout.unflatten(h0), tol=tol, max_iter=max_iter,
                              on_failure=on_failure, on_cost="ignore",
                              method="sequential" if route == "loop" else "newton")
    return layout.flatten(states)


def _compiled_kernels(cell, route: str, X: Tensor, h0: Tensor, layout: StateLayout, tol: float,
                      max_iter: int | None, on_failure: str,
                      params: tuple) -> tuple[Tensor, SolveInfo | None]:
    from ..cells import compiled, modules, newton

    T = X.shape[1]
    Hs = cell.hidden_size
    lstm = layout.is_tuple
    gru = isinstance(cell, (modules.GRUCell, modules.DiagGRUCell))
    w_ih, b_ih, w, b = params
    gi = compiled.input_projection(X.transpose(0, 1), w_ih, b_ih, Hs)
    h, c = (h0[:, :Hs], h0[:, Hs:]) if lstm else (h0, None)
    if route == "sweeps":
        if lstm or gru:
            kind = compiled._LSTM if lstm else compiled._GRU
        else:
            kind = compiled._ELMAN_TANH if cell.nonlinearity == "tanh" else compiled._ELMAN_RELU
        cap = min(T, max_iter if max_iter is not None else DEFAULT_MAX_ITER["newton"])
        states, info = newton.newton_sequence(
            kind, gi, h, w, w.new_zeros(w.shape[0]) if b is None else b, target=tol,
            accept=tol, max_iter=cap, on_failure=on_failure, c0=c)
    else:
        info = None
        if lstm:
            states = compiled.lstm_sequence(gi, h, c, w, b)
        elif gru:
            states = compiled.gru_sequence(gi, h, w, b)
        else:
            states = compiled.elman_sequence(gi, h, w, b, cell.nonlinearity)
    H = torch.cat(states, dim=-1) if lstm else states  # (B, T, D)
    return H, info


def _default_init(fc: FlatCell, X: Tensor, D: int, cell_dtype: torch.dtype,
                  source: str | None = None) -> Tensor:
    """The default first guess, h_t = cell(x_t, 0) for every t (as ParaRNN): (B, T, D); by
    the compiled cell where the solve's Jacobians are compiled."""
    B, T = X.shape[:2]
    return _eval(fc, source, X, torch.zeros(B, T, D, dtype=cell_dtype, device=X.device),
                 cell_dtype)


def _work_dtype_and_tol(dtype: torch.dtype, tol: float | None) -> tuple[torch.dtype, float]:
    """The dtype the iteration works in (half precisions accumulate in float32) and the
    tolerance (``DEFAULT_TOL`` by the inputs' dtype when ``tol`` is None)."""
    work = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    return work, float(tol if tol is not None else DEFAULT_TOL.get(dtype, 1e-5))


def _check_args(cell, inputs, method, tol, max_iter, jacobian, on_failure, grad):
    if not callable(cell):
        raise TypeError(f"solve_recurrence: cell must be callable as cell(x_t, h_prev) -> h_t; "
                        f"got {type(cell).__name__}")
    if not isinstance(inputs, Tensor):
        raise TypeError(f"solve_recurrence: inputs must be a torch.Tensor of shape (..., T, n); "
                        f"got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise ValueError(f"solve_recurrence: inputs must have shape (..., T, n) with a time dim "
                         f"and a feature dim; got shape {tuple(inputs.shape)} (for a scalar "
                         f"input per step use inputs.unsqueeze(-1))")
    if not inputs.is_floating_point():
        raise TypeError(f"solve_recurrence: inputs must be floating point; got {inputs.dtype}")
    if method != "auto" and method not in METHODS:
        raise ValueError(f"solve_recurrence: unknown method {method!r}; valid: 'auto', "
                         + ", ".join(repr(m) for m in METHODS))
    if jacobian not in JACOBIANS:
        raise ValueError(f"solve_recurrence: unknown jacobian {jacobian!r}; valid: "
                         + ", ".join(repr(j) for j in JACOBIANS))
    if on_failure not in ON_FAILURE:
        raise ValueError(f"solve_recurrence: on_failure must be one of "
                         f"{', '.join(repr(o) for o in ON_FAILURE)}; got {on_failure!r}")
    if grad not in GRADS:
        raise ValueError(f"solve_recurrence: grad must be 'implicit' or 'unrolled'; got {grad!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not math.isfinite(tol) or tol <= 0):
        raise ValueError(f"solve_recurrence: tol must be a positive finite number; got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        raise ValueError(f"solve_recurrence: max_iter must be an int >= 1; got {max_iter!r}")


def _as_batch_state(state: State, layout: StateLayout, batch: torch.Size, what: str,
                    inputs: Tensor, time: int | None = None) -> Tensor:
    """A (..., [T,] D) state (or tuple) as one flat (B, [T,] D) tensor, with checks."""
    for p in _state_parts(state, layout):
        if p.device != inputs.device:
            raise ValueError(f"solve_recurrence: {what} is on {p.device} but inputs are on "
                             f"{inputs.device}")
        if not p.is_floating_point():
            raise TypeError(f"solve_recurrence: {what} must be floating point; got {p.dtype}")
        if p.dtype != inputs.dtype:  # as torch.nn.GRUCell, which refuses to mix them
            raise RuntimeError(f"solve_recurrence: {what} and inputs must have the same dtype, "
                               f"but got {p.dtype} for {what} and {inputs.dtype} for inputs; "
                               f"convert one of them (e.g. {what}.to(inputs.dtype))")
        lead = p.shape[:-1] if time is None else p.shape[:-2]
        if time is not None and (p.dim() < 2 or p.shape[-2] != time):
            raise ValueError(f"solve_recurrence: {what} must have shape (..., T, D) with T = "
                             f"{time}; got {tuple(p.shape)}")
        try:
            if torch.broadcast_shapes(lead, batch) != batch:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"solve_recurrence: {what} has batch dims {tuple(lead)}, which do "
                             f"not broadcast to the inputs' batch dims {tuple(batch)}") from None
    flat = layout.flatten(state)
    tail = flat.shape[-1:] if time is None else flat.shape[-2:]
    B = math.prod(batch)
    return flat.expand(*batch, *tail).reshape(B, *tail)


@eager
def solve_recurrence(
    cell: Callable,
    inputs: Tensor,
    h0: State | None = None,
    *,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    jacobian: str = "auto",
    init: State | None = None,
    on_failure: str = "fallback",
    grad: str = "implicit",
    return_info: bool = False,
    hutchinson_samples: int = 8,
    generator: torch.Generator | None = None,
    on_cost: str = "warn",
) -> State | tuple[State, SolveInfo]:
    """The states of h_t = cell(x_t, h_{t-1}), t = 1..T, computed in parallel over T.

    Args:
        cell: ``cell(x, h) -> h_new`` with torch's cell convention, input first: x (N, n),
            h (N, D) or a tuple of (N, D_i) (LSTM's (h, c)), returning the state's structure.
            torch.nn.RNNCell, GRUCell, LSTMCell, any nn.Module or function of that form. It is
            called on all T steps at once (N = batch x T rows), so rows must be independent.
            It may provide analytic Jacobians (see ``paraseq.solve.cell``).
        inputs: (..., T, n).
        h0: the state before the first step, (..., D) or a tuple of (..., D_i); None means
            zeros, sized by the cell's ``hidden_size`` (or ``state_sizes``) attribute.
        method: ``"sequential"``, ``"newton"``, ``"quasi_newton"``, ``"damped_newton"``,
            ``"picard"``, ``"jacobi"`` or ``"auto"`` (see ``choose_method``). ``"newton"``
            forms no Jacobian where the residuals say it is not needed: at an iterate they
            predict converged (f alone is evaluated), and for a last step that the
            Jacobians one iterate old are predicted to finish (a chord step: its residual
            about r_k^2 / r_{k-1} where Newton's is r_k^2 / r_{k-1}^2 r_k); a prediction
            that fails costs one evaluation of f and Newton resumes.
        tol: tolerance on the scaled residual max_t |h_t - f(x_t, h_{t-1})| / (1 + |f|);
            default by dtype (``DEFAULT_TOL``: 1e-10 float64, 1e-5 float32). A per-step
            bound: the states' error adds the residuals up along the trajectory where the
            cell is near-neutral. So with the default in float32, a parallel solve whose
            residual is above the rounding floor gets one exact Newton step (``_polish``,
            about one implicit backward pass, or one scan where a newton solve's last
            Jacobians serve; dense Jacobians up to ``POLISH_MAX_D``),
            which leaves the states within the loop's own float32 error. A tol given means
            that per-step residual exactly.
        max_iter: cap on linear solves (default ``DEFAULT_MAX_ITER``, at most T).
        jacobian: ``"auto"`` (analytic if the cell provides it, else autograd), ``"analytic"``,
            ``"autograd"`` (exact, by torch.func's forward mode over the rows, vmap(jacfwd);
            a cell torch.func cannot trace gets D vector-Jacobian products per row),
            ``"compiled"`` (the same Jacobian, with f and the scan's right-hand side, in one
            torch.compile'd function per cell and shapes, ``paraseq.solve.jit``: several
            times faster per iteration, at a first call that compiles for seconds; where
            torch.compile fails, a warning and the eager path), or
            ``"hutchinson"`` (quasi_newton only: a stochastic estimate of the diagonal from
            ``hutchinson_samples`` Rademacher probes, drawn from ``generator``).
        init: an initial trajectory (..., T, D) (a warm start, e.g. last step's solution);
            default h_t = cell(x_t, 0), as ParaRNN does.
        on_failure: what happens when the iteration stops with the residual above ``tol``
            (at ``max_iter``, or after 8 iterations without halving the residual):
            ``"fallback"`` keeps the steps that satisfy the tolerance up to the first one that
            does not, and finishes from there: by restarting the parallel solve when it got at
            least a quarter of the way (at most 3 restarts), else by the sequential loop. The
            result always satisfies the tolerance. ``"raise"``: ``ConvergenceError``.
            ``"warn"``: the last iterate, a warning and ``info.converged = False``; where the
            cell returned nan or inf, the steps from the first unconverged one are the loop's
            (so the loop's nan and inf are where the loop has them).
        grad: ``"implicit"``: exact gradients by the adjoint, one reverse scan with the true
            Jacobian at the solution, whatever linearisation the forward used. ``"unrolled"``:
            autograd through exactly ``max_iter`` iterations (the iterations are the model;
            ``on_failure`` does not apply).
        return_info: also return a ``SolveInfo``.
        on_cost: what happens when a forced parallel method (not ``"auto"``) is estimated
            (``estimate_cost``) to cost over ``COST_FACTOR`` (100) times the sequential loop
            and over a second: ``"warn"`` (a RuntimeWarning, then it runs), ``"raise"``
            (ValueError), ``"ignore"``.

    Returns:
        states (..., T, D) (a tuple of (..., T, D_i) for tuple states), in the inputs' dtype;
        ``(states, info)`` with ``return_info``.

    paraseq's own cells (``paraseq.cells``: ElmanCell, GRUCell, LSTMCell, DiagGRUCell,
    DiagLSTMCell, exactly those types) on CPU float32/float64 tensors, with numba installed
    and ``grad="implicit"``, take the compiled kernels of ``paraseq.cells.compiled``: the input
    products of all T steps in one matmul, then ``method="sequential"`` runs the compiled loop
    (and ``"auto"`` chooses it: on a CPU it matches or beats every parallel method), and
    ``method="newton"`` (dense cells, no ``init``, analytic Jacobians) the compiled Newton
    sweeps of ``paraseq.cells.newton`` (``info.jacobian`` "analytic (compiled sweep)") at this
    function's ``tol``, ``max_iter`` and ``on_failure``; gradients by the compiled adjoint
    sweep. Every other case takes the general loop below (all cases, with
    ``paraseq.solve.api.COMPILED_CELLS = False``). On CUDA, DiagGRUCell and DiagLSTMCell with
    method "auto", "newton" or "quasi_newton" (implicit gradients, no ``init``, analytic
    Jacobians) take ``paraseq.gpu``'s fused Newton instead: one Triton kernel per iteration,
    exact Newton for both methods, at this function's ``tol``, ``max_iter`` and
    ``on_failure`` (``info.jacobian`` "analytic (fused, triton kernel)", or "(fused, torch
    twin)" without triton); so do GRUCell, ElmanCell and LSTMCell with Newton (``"newton"``,
    or ``"auto"`` choosing it) while their state fits the dense kernels (D <= 64):
    ``paraseq.gpu.dense_newton``, ``info.jacobian`` "analytic (fused dense, triton kernel)"
    (or "(fused dense, torch twin)").

    Under torch.compile the solve runs eagerly (``torch.compiler.disable``; a graph break in
    a compiled caller): its loop stops on a data-dependent test on the host, which Dynamo would
    retrace for every iteration count.

    Higher-order gradients: ``grad="unrolled"`` and ``method="sequential"`` are autograd
    through the computation, exact to any order. ``grad="implicit"`` is exact to second order
    for every method (gradient penalties, Hessian-vector products, MAML: a backward with
    create_graph=True builds the adjoint as differentiable operations, see ``_Implicit``) and
    raises a RuntimeError naming those alternatives when differentiated a third time.

    The cell's contract (deterministic, independent rows) is checked after a parallel solve by
    a probe of 16 rows evaluated twice: a stochastic cell (dropout in training mode) or one
    that mixes rows gets a RuntimeWarning and the sequential loop instead. A cell that writes
    into its x or h in place is a ValueError naming it. h0 and init must have the inputs'
    dtype (a RuntimeError otherwise, as torch.nn.GRUCell). T = 0 returns an empty result on
    the inputs' graph; batch 0 or a state of size 0 runs the loop; meta tensors return the
    shapes (one evaluation of the cell); torch.inference_mode works like no_grad.

    Mid-iteration nan and inf are reset (nan -> 0, clip to +-1e8, as DEER does); a result is
    accepted only when its residual is under ``tol`` everywhere, so they cannot leak into a
    returned result unless the sequential loop itself produces them. bfloat16 and float16
    inputs run the cell in their dtype and everything else in float32.
    """
    _check_args(cell, inputs, method, tol, max_iter, jacobian, on_failure, grad)
    _check_cell_device(cell, inputs)
    if on_cost not in ON_COST:
        raise ValueError(f"solve_recurrence: on_cost must be one of "
                         f"{', '.join(repr(o) for o in ON_COST)}; got {on_cost!r}")
    T, n = inputs.shape[-2], inputs.shape[-1]
    batch = inputs.shape[:-2]
    B = math.prod(batch)
    if h0 is None:
        h0 = _default_state(cell, batch, inputs)
    layout = StateLayout.of(h0)
    _check_state_against_cell(cell, layout)
    fc = FlatCell(cell, layout)
    D = layout.D
    cell_dtype = inputs.dtype
    polish = tol is None and inputs.dtype == torch.float32
    work_dtype, tol = _work_dtype_and_tol(inputs.dtype, tol)
    X = inputs.reshape(B, T, n)  # (B, T, n)
    h0_flat = _as_batch_state(h0, layout, batch, "h0", inputs).to(work_dtype)  # (B, D)
    if method == "auto":
        training = torch.is_grad_enabled() and (
            inputs.requires_grad or any(p.requires_grad for p in _state_parts(h0, layout))
            or any(p.requires_grad for p in getattr(cell, "parameters", lambda: ())()))
        name = choose_method(T, B, D, fc, inputs.device, training)
        if (not training and inputs.device.type == "cpu" and T >= PROBE_MIN_T and B * D > 0
                and not (fc.has_full or fc.has_diag or fc.has_blocks or fc.diag_exact)
                and B * D * D <= _CPU_PARALLEL_WORK["probe"]):
            name = probe_method(fc, X, h0_flat, cell_dtype, jacobian)
    else:
        name = method
    m = METHODS[name]
    info = SolveInfo(method=name, tol=tol)

    def finish(H: Tensor) -> State:  # (B, T, D) -> the caller's structure
        out = H.to(inputs.dtype).reshape(*batch, T, D)
        return layout.unflatten(out)

    def done(H: Tensor):
        states = finish(H)
        return (states, info) if return_info else states

    held = _held_tensors(cell)
    if T == 0:  # empty, but on the graph of inputs, h0 and the cell's tensors (zero gradients)
        H = h0_flat.unsqueeze(1)[:, :0] + X[:, :0].sum(-1, keepdim=True).to(work_dtype)
        for p in held:
            H = H + p.flatten()[:0].sum().to(work_dtype)
        return done(H)
    if inputs.device.type == "meta":  # shapes only: one evaluation of the cell, no iteration
        info.method = "sequential"
        return done(evaluate(fc, X, h0_flat.to(cell_dtype).unsqueeze(1).expand(B, T, D)))
    if B == 0 or D == 0:  # nothing to solve for: the loop (autograd through it) is exact
        name = "sequential"
        info.method = "sequential"
        m = METHODS[name]
    if _fused_route(cell, method, X, grad, init, jacobian, name):
        H, info = _run_fused(cell, X, h0_flat, layout, tol, max_iter, on_failure)
        return done(H)
    route = _compiled_route(cell, method, name, X, grad, init, jacobian)
    if route is not None:
        H, routed = _run_compiled(cell, route, X, h0_flat, layout, tol, max_iter, on_failure)
        info = routed if routed is not None else dataclasses.replace(
            info, method="sequential", converged=True, residual=0.0)
        return done(H)
    if method == "auto" and m.structure != "loop":  # would the parallel pick crawl? (chaos)
        from ..diagnostics.predict import guard_auto
        name, info.lle = guard_auto(fc, X, h0_flat, cell_dtype, name)
        m, info.method = METHODS[name], name
    if m.structure == "loop":
        H = sequential(fc, X, h0_flat, cell_dtype)
        info.converged, info.residual = True, 0.0
        return done(H)
    if method != "auto":
        _check_cost(name, B, T, D, n, fc, inputs.device, jacobian, on_cost)

    source = resolve_jacobian(m, jacobian, fc)
    info.jacobian = source
    cap = min(T, max_iter if max_iter is not None else DEFAULT_MAX_ITER[name])
    if init is not None:
        init_layout = StateLayout.of(init, "init")
        if init_layout != layout:
            raise ValueError(f"solve_recurrence: init must have the state's structure "
                             f"(feature sizes {layout.sizes}); got {init_layout.sizes}")
        H0 = _as_batch_state(init, layout, batch, "init", inputs, time=T).to(work_dtype)
    else:
        with torch.no_grad():
            H0 = _default_init(fc, X, D, cell_dtype, source).to(work_dtype)
    dense_bytes, block_bytes = _jacobian_bytes(B, D, work_dtype)
    blocks_fwd = fc.has_blocks and source == "analytic" and name != "damped_newton"
    chunk_T = max(1, DENSE_MEMORY_LIMIT // max(block_bytes if blocks_fwd else dense_bytes, 1))
    adjoint_chunk_T = _adjoint_chunk(B, D, fc, work_dtype)
    loop_kw = dict(tol=tol, cell_dtype=cell_dtype, samples=hutchinson_samples,
                   generator=generator)

    if grad == "unrolled":
        res = run(fc, m, source, X, h0_flat, H0, max_iter=cap, fixed_iterations=True, **loop_kw)
        info.iterations, info.residuals = res.iterations, res.residuals
        info.linear_solves = res.iterations
        info.residual = res.residuals[-1]
        info.converged = info.residual <= tol
        if _contract_broken(fc, X, shift(res.H.detach(), h0_flat.detach()), res.F.detach(),
                            cell_dtype, name, info.converged):
            return done(_loop_instead(fc, X, h0_flat, cell_dtype, info))
        return done(res.H)

    # the same large tensors are allocated every iteration: keep freed ones in the heap
    heap_bytes = min(T, chunk_T) * (dense_bytes if m.structure == "dense" else B * D * 4) // 4
    with _heap.retained(heap_bytes if X.device.type == "cpu" else 0):
        last: dict = {}  # the loop's last f and Jacobians, for the polish (one time chunk only)
        with torch.no_grad():
            if m.structure != "dense" or chunk_T >= T:
                H = _solve(fc, m, source, X, h0_flat, H0.detach(), cap, on_failure, info,
                           loop_kw, last=last)
            else:  # time chunks with the carried state, to bound the dense Jacobians' memory
                parts, h_start, per_chunk = [], h0_flat, []
                for s in range(0, T, chunk_T):
                    e = min(T, s + chunk_T)
                    before = info.iterations
                    Hc = _solve(fc, m, source, X[:, s:e], h_start, H0[:, s:e].detach(),
                                min(cap, e - s), on_failure, info, loop_kw, offset=s)
                    per_chunk.append(info.iterations - before)
                    parts.append(Hc)
                    h_start = Hc[:, -1]
                    info.time_chunks = len(parts)
                H = torch.cat(parts, dim=1)
                # the chunks run one after another: a time step went through its chunk's
                # iterations only (the total is info.linear_solves)
                info.linear_solves, info.iterations = info.iterations, max(per_chunk)
        if info.linear_solves == 0:
            info.linear_solves = info.iterations
        F = None
        if polish and on_failure != "warn" and (D <= POLISH_MAX_D or fc.diag_exact
                                                or fc.has_blocks):
            with torch.no_grad():
                H, F = _polish(fc, X, H, h0_flat, cell_dtype, adjoint_chunk_T, source,
                               last.get("F"), last.get("A"))
    # one evaluation at the solution: the residual that is reported, and, for the implicit
    # gradient, the differentiable f whose backward receives the adjoint (see _Implicit)
    if F is not None and not torch.is_grad_enabled():  # the polish's, without a graph
        pass
    elif source == "compiled" and not torch.is_grad_enabled():  # no graph needed: compiled f
        F = _eval(fc, source, X, shift(H, h0_flat), cell_dtype)
    else:
        F = evaluate(fc, X, shift(H.to(cell_dtype), h0_flat.to(cell_dtype)))
    info.residual = residual_max(H, F.detach().to(work_dtype))
    info.converged = info.residual <= tol
    if _contract_broken(fc, X, shift(H, h0_flat).detach(), F.detach(), cell_dtype, name,
                        info.converged):
        return done(_loop_instead(fc, X, h0_flat, cell_dtype, info))
    if F.requires_grad:
        adj = _Adjoint(fc, X, shift(H, h0_flat).detach(), cell_dtype, adjoint_chunk_T, source)
        H = _Implicit.apply(F, H, adj, _Switch(), h0_flat, *_anchors(F, X, h0_flat, cell))
    return done(H)


def _solve(fc: FlatCell, m: Method, source: str | None, X: Tensor, h0: Tensor, H0: Tensor,
           cap: int, on_failure: str, info: SolveInfo, loop_kw: dict, offset: int = 0,
           last: dict | None = None) -> Tensor:
    """One parallel solve of a time segment, with the failure policy. Updates info; where
    ``last`` is given and the solve converged, it receives f at the solution ("F") and the
    last dense Jacobians ("A", or None)."""
    tol = loop_kw["tol"]
    res: LoopResult = run(fc, m, source, X, h0, H0, max_iter=cap, **loop_kw)
    info.iterations += res.iterations
    info.residuals.extend(res.residuals)
    if res.converged:
        if last is not None and res.F.dtype == res.H.dtype:
            last["F"], last["A"] = res.F, res.A
        return res.H
    if on_failure == "raise":
        info.residual = res.residuals[-1]
        raise ConvergenceError(
            f"solve_recurrence: method={m.name!r} stopped after {res.iterations} iterations "
            f"with residual {res.residuals[-1]:.3e} > tol {tol:.1e}; use on_failure='fallback' "
            f"to finish sequentially from the first unconverged step, raise max_iter, or try "
            f"method='damped_newton'", res.iterations, res.residuals[-1], info)
    H = res.H
    T = H.shape[1]
    t0 = first_failure(residual_map(H, res.F), tol)
    if on_failure == "warn":
        # the cell gave nan or inf at the last iterate, which was reset (nan -> 0) mid-iteration
        # and would hide them: when the loop from the first unconverged step has them too, it
        # is returned, so that nan and inf are where the loop has them
        rest = None
        if not bool(torch.isfinite(res.F).all()):
            start = H[:, t0 - 1] if t0 > 0 else h0
            rest = sequential(fc, X[:, t0:], start, loop_kw["cell_dtype"]).to(H.dtype)
            if bool(torch.isfinite(rest).all()):
                rest = None
        if rest is None:
            warnings.warn(f"solve_recurrence: method={m.name!r} did not converge in "
                          f"{res.iterations} iterations (residual {res.residuals[-1]:.3e} > "
                          f"tol {tol:.1e}); returning the last iterate", RuntimeWarning,
                          stacklevel=3)
            return res.H
        warnings.warn(f"solve_recurrence: method={m.name!r} did not converge in "
                      f"{res.iterations} iterations: the cell returned nan or inf (first "
                      f"unconverged step {offset + t0}); the steps from there are the "
                      f"sequential loop's, non-finite values included", RuntimeWarning,
                      stacklevel=3)
        info.fell_back = True
        info.fallback_from = offset + t0 if info.fallback_from is None else info.fallback_from
        return torch.cat([H[:, :t0], rest], dim=1)
    # fallback: keep the prefix that satisfies the tolerance, finish the rest
    info.fell_back = True
    info.fallback_from = offset + t0 if info.fallback_from is None else info.fallback_from
    start = H[:, t0 - 1] if t0 > 0 else h0
    rest_X = X[:, t0:]
    if info.restarts < _RESTARTS and t0 >= max(1, T // 4) and T - t0 > 64:
        info.restarts += 1
        init = _default_init(fc, rest_X, H.shape[-1], loop_kw["cell_dtype"])  # under no_grad
        rest = _solve(fc, m, source, rest_X, start, init.to(H.dtype), min(cap, T - t0),
                      on_failure, info, loop_kw, offset=offset + t0)
    else:
        rest = sequential(fc, rest_X, start, loop_kw["cell_dtype"]).to(H.dtype)
    return torch.cat([H[:, :t0], rest], dim=1)


PROBE_ROWS = 16
"""Rows of the probe that checks a cell's contract after a parallel solve (``_contract_broken``)."""


def _contract_broken(fc: FlatCell, X: Tensor, Hp: Tensor, F: Tensor, cell_dtype: torch.dtype,
                     method: str, converged: bool = True) -> bool:
    """Whether the cell breaks what a parallel solve relies on, with a warning that says which.

    The parallel methods evaluate the cell on all B T rows at once and assume the same rows give
    the same values however they are batched and however often they are evaluated. A probe
    evaluates up to ``PROBE_ROWS`` of those rows (a strict subset, spread over batch and time)
    twice, under no_grad: two probes that differ mean a stochastic cell (dropout in training
    mode, noise): an implicit gradient would re-sample it and not be the gradient of the
    trajectory returned. A probe that differs from the same rows of the full evaluation F
    means a cell that mixes rows (batch statistics, attention across the batch): the parallel
    result is not the loop's. Either way the caller gets a warning and the sequential loop
    (``_loop_instead``). The cost: two cell calls on 16 rows."""
    B, T, D = Hp.shape
    N = B * T
    if N < 2 or D == 0:
        return False
    k = min(PROBE_ROWS, N // 2)
    idx = torch.linspace(0, N - 1, k, device=X.device).round().long()  # (k,)
    x = X.reshape(N, X.shape[-1])[idx]
    h = Hp.reshape(N, D)[idx].to(cell_dtype)
    want = F.reshape(N, D)[idx].to(cell_dtype)
    try:
        with torch.no_grad():
            p1, p2 = fc(x, h), fc(x, h)  # (k, D)
    except (RuntimeError, ValueError):  # a cell that takes only whole batches (odeint's): no
        return False  # probe of a subset; the in-place check has run with the full call
    eps = torch.finfo(cell_dtype).eps
    tol = max(eps ** 0.5, 1e-12)

    def far(u: Tensor, v: Tensor) -> bool:  # beyond rounding, nan-aware (nan == nan here)
        both_nan = u.isnan() & v.isnan()
        d = ((u - v).abs() > tol * (1 + v.abs())) | (u.isnan() ^ v.isnan())
        return bool((d & ~both_nan).any())

    if far(p1, p2):
        warnings.warn(f"solve_recurrence: the cell is not deterministic: two evaluations on the "
                      f"same inputs differ (dropout in training mode, or noise?). A parallel "
                      f"method={method!r} and its implicit gradient evaluate the cell many "
                      f"times, so their result would not be one sample of the model; running "
                      f"the sequential loop instead (the gradient is autograd's through it). "
                      f"Use method='sequential' to silence this, or make the cell "
                      f"deterministic (module.eval())", RuntimeWarning, stacklevel=3)
        return True
    if converged and far(p1, want):  # (far from a solution, a cell's own inner iterations
        # may round differently on fewer rows: only a converged solve is checked for this)
        warnings.warn(f"solve_recurrence: the cell's rows are not independent: the same rows "
                      f"evaluated alone and within all batch x time rows differ (batch "
                      f"statistics? mixing across the batch?). method={method!r} evaluates all "
                      f"time steps as one batch, which such a cell does not allow; running the "
                      f"sequential loop instead. Use method='sequential' to silence this",
                      RuntimeWarning, stacklevel=3)
        return True
    return False


def _loop_instead(fc: FlatCell, X: Tensor, h0: Tensor, cell_dtype: torch.dtype,
                  info: SolveInfo) -> Tensor:
    """The sequential loop, with autograd through it, after ``_contract_broken``."""
    H = sequential(fc, X, h0, cell_dtype)
    info.method, info.fell_back, info.fallback_from = "sequential", True, 0
    info.converged, info.residual = True, 0.0
    return H


COST_FACTOR = 100.0
"""``on_cost`` acts when a forced parallel method's estimated cost is over this many times the
sequential loop's (and over ``COST_MIN_SECONDS``)."""
COST_MIN_SECONDS = 1.0
_FLOPS = {"cpu": 1e10, "cuda": 1e13}  # rough sustained rates, flop/s
_STEP_SECONDS = {"cpu": 30e-6, "cuda": 100e-6}  # the loop's fixed cost per step
ON_COST = ("warn", "raise", "ignore")


def _cell_flops(cell: Callable, n: int, D: int) -> float:
    """Flops of one cell call per row: 2 per parameter of a module (a dense layer's), else a
    dense layer's guess 2 D (n + D)."""
    params = sum(p.numel() for p in getattr(cell, "parameters", lambda: ())())
    return float(2 * params if params else 2 * D * (n + D))


def estimate_cost(name: str, B: int, T: int, D: int, n: int, fc: FlatCell,
                  device: torch.device, jacobian: str = "auto") -> tuple[float, float]:
    """Seconds, roughly: (a lower bound on a parallel method's solve, the sequential loop).

    A lower bound: two iterations (Newton needs at least that), each one cell evaluation over
    the B T rows, its Jacobian (autograd: D backward passes, about 3 evaluations each; analytic:
    about D^2 per row) and the scan (dense: the tree's matrix products, about 4 D^3 per step;
    diagonal, identity: about 8 D; damped_newton's block tridiagonal solves are like dense).
    The loop: T steps of its fixed per-step cost plus one evaluation over B rows each. The
    rates are rough (``_FLOPS``, ``_STEP_SECONDS``): the estimate tells a day from a second,
    not 2x from 3x."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    c = _cell_flops(fc.cell, n, D)
    m = METHODS[name]
    rows = B * T
    if m.structure in ("dense", "diagonal"):
        if jacobian == "hutchinson":
            jac = 8 * 3 * c
        else:
            analytic = (fc.has_full or fc.has_blocks or fc.has_diag) and jacobian != "autograd"
            jac = D * D * 4.0 if analytic else D * 3 * c
        dense = m.structure == "dense" and not (fc.has_blocks and name != "damped_newton")
        scan = 4.0 * D ** 3 if dense else 8.0 * D
    else:
        jac, scan = 0.0, 8.0 * D
    parallel = 2 * rows * (c + jac + scan) / _FLOPS[kind]
    loop = T * (_STEP_SECONDS[kind] + B * c / _FLOPS[kind])
    return parallel, loop


def _check_cost(name: str, B: int, T: int, D: int, n: int, fc: FlatCell, device: torch.device,
                jacobian: str, on_cost: str) -> None:
    if on_cost == "ignore" or device.type not in ("cpu", "cuda"):
        return
    parallel, loop = estimate_cost(name, B, T, D, n, fc, device, jacobian)
    if parallel < COST_MIN_SECONDS or parallel < COST_FACTOR * loop:
        return
    msg = (f"solve_recurrence: method={name!r} on this problem (batch {B}, T = {T}, D = {D}) "
           f"is estimated to take at least {parallel:.3g} s, {parallel / loop:.3g}x the "
           f"sequential loop's {loop:.3g} s (its Jacobians and scans grow as D^2 to D^3 per "
           f"step); use method='auto' or 'sequential', or on_cost='ignore' to run it anyway")
    if on_cost == "raise":
        raise ValueError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _check_cell_device(cell: Callable, inputs: Tensor) -> None:
    """A cell's tensors on another device than the inputs (a module on CUDA with CPU inputs,
    or the other way round): a ValueError naming both devices, before anything runs, instead
    of torch's error from inside the cell. Checks an nn.Module's parameters and buffers (or
    those of the module a bound method belongs to) and the tensors requiring grad in a
    function's closure (``_held_tensors``)."""
    owner = cell if isinstance(cell, torch.nn.Module) else getattr(cell, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        named = [(f"the cell's {n}", t) for n, t in (*owner.named_parameters(),
                                                       *owner.named_buffers())]
        fix = "cell.to(inputs.device)"
    else:
        named = [("a tensor the cell holds", t) for t in _held_tensors(cell)]
        fix = "move that tensor to inputs.device"
    for what, t in named:
        if t.device != inputs.device:
            raise ValueError(f"solve_recurrence: {what} is on {t.device} but inputs are on "
                             f"{inputs.device}; put them on one device ({fix}, or "
                             f"inputs.to({str(t.device)!r}))")


def _jacobian_bytes(B: int, D: int, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes per time step of the dense Jacobians (J, A*h and the scan's buffers) and of
    compact k x k blocks (k <= 4 assumed: k / D of the dense bytes)."""
    dense = B * D * D * torch.finfo(dtype).bits // 8 * 4
    return dense, dense * 4 // max(D, 1)


def _adjoint_chunk(B: int, D: int, fc: FlatCell, dtype: torch.dtype) -> int:
    """Time steps per chunk of the implicit gradient's adjoint scans (``DENSE_MEMORY_LIMIT``)."""
    dense, block = _jacobian_bytes(B, D, dtype)
    need = dense // max(D, 1) if fc.diag_exact else block if fc.has_blocks else dense
    return max(1, DENSE_MEMORY_LIMIT // max(need, 1))
