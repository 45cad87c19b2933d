"""S4 and S4D layers: per-channel HiPPO state space models, convolutional and recurrent.

Shape letters: B batch, L sequence length, H channels (d_model), N state size (d_state),
M = N/2 complex modes (one of each conjugate pair), r rank of the low-rank part, c kernels per
channel (2 when bidirectional).

Each of the H channels is its own single-input single-output SSM x' = A x + B u, y = C x + D u
with a learnable step dt = exp(log_dt). Training runs it as a causal convolution with the
kernel K_k = C Ab^k Bb (FFT, zero-padded to 2L); inference can run it as a recurrence, one step
at a time (``setup_step``, ``default_state``, ``step``), with the same outputs.

- ``S4``: A = Lambda - P P^* (diagonal plus low rank, from HiPPO by ``paraseq.ssm.dplr``),
  kernel by ``paraseq.ssm.kernel_dplr`` (Cauchy + Woodbury, bilinear rule). As in S4 the
  parameter is C~ = C (I - Ab^l_max), so the kernel needs no matrix powers; the recurrence
  recovers C once in ``setup_step``.
- ``S4D``: diagonal A (S4D-Lin, S4D-Inv or S4D-LegS initialisation), kernel by the Vandermonde
  product ``paraseq.ssm.kernel_diagonal`` (zero-order hold), any length.
- ``S4Block``: norm -> S4 / S4D -> activation -> dropout -> Linear(H, 2H) -> GLU -> dropout ->
  residual, the gated block of the S4 paper.

References: Gu, Goel, Re, "Efficiently Modeling Long Sequences with Structured State Spaces"
(ICLR 2022); Gu, Gupta, Goel, Re, "On the Parameterization and Initialization of Diagonal
State Space Models" (NeurIPS 2022).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ssm.discretize import discretize, discretize_diagonal
from ..ssm.hippo import MEASURES, dplr, s4d_init
from ..ssm.kernels import kernel_diagonal, kernel_dplr, ssm_scan


def _check_int(cls: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}: {name} must be an int >= {minimum}; got {value!r}")
    return value


def _check_dt_range(cls: str, dt_min: float, dt_max: float) -> None:
    if not (0 < dt_min <= dt_max < math.inf):
        raise ValueError(f"{cls}: need 0 < dt_min <= dt_max; got dt_min={dt_min}, "
                         f"dt_max={dt_max}")


def _complex(t: Tensor) -> Tensor:
    return torch.view_as_complex(t.contiguous())


def _real_param(z: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.view_as_real(z).clone())


class _SSMLayer(nn.Module):
    """What S4 and S4D share: dt, D, the input layout, the FFT convolution, the recurrence."""

    d_model: int
    d_state: int
    bidirectional: bool
    transposed: bool

    def _init_common(self, d_model: int, d_state: int, dt_min: float, dt_max: float,
                     bidirectional: bool, transposed: bool, factory: dict) -> None:
        name = type(self).__name__
        self.d_model = _check_int(name, "d_model", d_model)
        self.d_state = _check_int(name, "d_state", d_state, 2)
        if d_state % 2:
            raise ValueError(f"{name}: d_state must be even (the state is N/2 conjugate pairs "
                             f"of a real system); got {d_state}")
        _check_dt_range(name, dt_min, dt_max)
        self.bidirectional = bool(bidirectional)
        self.transposed = bool(transposed)
        H = d_model
        u = torch.rand(H, **factory)
        self.log_dt = nn.Parameter(math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min)))
        self.D = nn.Parameter(torch.randn(H, **factory))
        self._step_ready = False

    # ---------------------------------------------------------------- convolution mode

    def kernel(self, L: int) -> Tensor:
        """The convolution kernel(s), (c, H, L): c = 2 when bidirectional (the second one
        runs backwards in time)."""
        raise NotImplementedError

    def _to_bhl(self, u: Tensor) -> Tensor:
        name = type(self).__name__
        if not isinstance(u, Tensor):
            raise TypeError(f"{name}: input must be a tensor; got {type(u).__name__}")
        layout = "(B, H, L)" if self.transposed else "(B, L, H)"
        if u.dim() != 3:
            raise ValueError(f"{name}: input must have 3 dims {layout}; got shape "
                             f"{tuple(u.shape)} (add a batch dim with u.unsqueeze(0))")
        h_dim = 1 if self.transposed else 2
        if u.shape[h_dim] != self.d_model:
            raise ValueError(f"{name}: input must be {layout} with H = d_model = "
                             f"{self.d_model}; got shape {tuple(u.shape)}"
                             + ("" if self.transposed else " (for (B, H, L) build the layer "
                                "with transposed=True)"))
        if u.shape[-1 if self.transposed else 1] < 1:
            raise ValueError(f"{name}: the sequence length must be >= 1; got shape "
                             f"{tuple(u.shape)}")
        return u if self.transposed else u.transpose(1, 2)

    def forward(self, u: Tensor, *, mode: str = "convolution") -> Tensor:
        """y = K * u + D u.

        Args:
            u: (B, L, H), or (B, H, L) when built with ``transposed=True``.
            mode: ``"convolution"`` (FFT, the training path) or ``"recurrent"`` (the same
                model as a recurrence over the whole sequence, by ``paraseq.linear_scan``;
                causal layers only).

        Returns:
            y in u's layout and shape.
        """
        x = self._to_bhl(u)  # (B, H, L)
        L = x.shape[-1]
        if mode == "recurrent":
            y = self._recurrent(x)  # (B, H, L)
        elif mode == "convolution":
            k = self.kernel(L)  # (c, H, L)
            n = 2 * L
            if self.bidirectional:
                k = F.pad(k[0], (0, L)) + F.pad(k[1].flip(-1), (L, 0))  # (H, 2L)
            else:
                k = k[0]  # (H, L)
            y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
            y = y + self.D[:, None] * x  # (B, H, L)
            if not self.bidirectional and not bool(torch.isfinite(y.sum())):
                y = self._causal_nonfinite(x, y)
        else:
            raise ValueError(f"{type(self).__name__}: mode must be 'convolution' or "
                             f"'recurrent'; got {mode!r}")
        return y if self.transposed else y.transpose(1, 2)

    # ---------------------------------------------------------------- recurrent mode

    def _check_causal(self, what: str) -> None:
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}: {what} needs a causal layer; this one is "
                             f"bidirectional (it reads the future)")

    def _recurrent(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _causal_nonfinite(self, x: Tensor, y: Tensor) -> Tensor:
        """y with the batch elements whose input holds nan or inf recomputed by the recurrent
        mode: an FFT spreads one non-finite input over every output, the past included, while
        the layer is causal (its step mode is non-finite only from that step on). Finite
        inputs pay one reduction over y."""
        rows = torch.nonzero(~torch.isfinite(x).flatten(1).all(1)).flatten()  # (M,)
        if rows.numel() == 0:  # the non-finite values came from the kernel or an overflow
            return y
        y = y.clone()
        y[rows] = self._recurrent(x[rows]).to(y.dtype)
        return y

    def setup_step(self) -> None:
        """Prepare the recurrent mode from the current parameters (call again after they
        change): the discrete Ab, Bb, C that ``step`` uses."""
        raise NotImplementedError

    def default_state(self, batch: int) -> Tensor:
        """The zero state for ``step``: (B, H, N) real for S4, (B, H, M) complex for S4D."""
        raise NotImplementedError

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One time step of the recurrence: (x_t (B, H), state) -> (y_t (B, H), new state).

        Running ``step`` over t = 0..L-1 from ``default_state`` gives ``forward``'s outputs.
        """
        name = type(self).__name__
        if not self._step_ready:
            raise RuntimeError(f"{name}: call setup_step() before step()")
        if not isinstance(x_t, Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.d_model:
            raise ValueError(f"{name}: step input must be (B, H) with H = {self.d_model}; got "
                             f"{tuple(x_t.shape) if isinstance(x_t, Tensor) else x_t!r}")
        expected = (x_t.shape[0], self.d_model, self._Bb.shape[-1])
        if not isinstance(state, Tensor) or tuple(state.shape) != expected:
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            letter = "N" if isinstance(self, S4) else "M"
            raise ValueError(f"{name}: step state must be (B, H, {letter}) = {expected} for "
                             f"this input (x_t {tuple(x_t.shape)}); got {got} (start from "
                             f"default_state(batch))")
        return self._step(x_t, state)

    def _step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}"
                + (", bidirectional=True" if self.bidirectional else "")
                + (", transposed=True" if self.transposed else ""))


class S4(_SSMLayer):
    """S4: per-channel HiPPO SSMs in diagonal-plus-low-rank form, run as a convolution.

    Parameters per channel h: ``log_dt`` (H,); A = diag(Lambda) - P P^* with
    Lambda = -exp(``log_neg_re``) + i ``im`` (H, M) and ``P`` (H, M, r); ``B`` (H, M);
    ``C`` = C~ (H, c, M) (complex values stored as (..., 2) real pairs); ``D`` (H,). The
    underlying real system has state size N = 2M; kernels are computed at length ``l_max``
    (C~ is defined relative to it) and cut to the input's length, so inputs may be at most
    ``l_max`` long.

    Args:
        d_model: H, the channels.
        d_state: N (even), the state size of each channel's SSM.
        l_max: the longest input; the kernel length that C~ refers to.
        measure: HiPPO initialisation of A, P, B: ``"legs"`` (default), ``"legt"``,
            ``"lagt"``, ``"fourier"``. Real parts of Lambda below ``real_floor`` in size are
            raised to -``real_floor`` (legt, lagt and fourier have Re Lambda = 0), keeping
            every mode strictly stable.
        method: ``"bilinear"`` (default, S4's), ``"backward_euler"`` or ``"euler"``.
        dt_min: lower end of the log-uniform range of the initial steps.
        dt_max: upper end of that range.
        bidirectional: add a second kernel that reads the future (no recurrent mode then).
        transposed: inputs are (B, H, L) instead of (B, L, H).
        wide_kernel: compute the kernel (Cauchy sums and Woodbury) in complex128 whatever
            the parameters' dtype, and cast it back. None (default): on CPU only, where it
            costs little. In float32 the Woodbury correction cancels catastrophically next
            to a slow mode (Re Lambda = -real_floor, a discrete pole near a node on the unit
            circle): complex64 arithmetic leaves the outputs of a LagT N = 64 layer 2e-5 from
            its float64 self over L = 1000, complex128 1.5e-7 (the recurrence: 4e-6).
    """

    def __init__(self, d_model: int, d_state: int = 64, *, l_max: int = 1024,
                 measure: str = "legs", method: str = "bilinear", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, bidirectional: bool = False, transposed: bool = False,
                 real_floor: float = 1e-4, wide_kernel: bool | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self._init_common(d_model, d_state, dt_min, dt_max, bidirectional, transposed, factory)
        self.l_max = _check_int("S4", "l_max", l_max)
        if not isinstance(measure, str) or measure not in MEASURES:
            raise ValueError(f"S4: unknown measure {measure!r}; valid: "
                             + ", ".join(repr(m) for m in MEASURES))
        if method not in ("bilinear", "backward_euler", "euler"):
            raise ValueError(f"S4: method must be 'bilinear', 'backward_euler' or 'euler' (ZOH "
                             f"has no Cauchy form; use S4D for it); got {method!r}")
        self.measure, self.method = measure, method
        self.wide_kernel = wide_kernel
        H, N = d_model, d_state
        cdtype = torch.complex64 if factory["dtype"] == torch.float32 else torch.complex128
        d = dplr(measure, N, half=True)
        rdtype = factory["dtype"]
        neg_re = (-d.Lambda.real).clamp_min(real_floor)
        self.log_neg_re = nn.Parameter(neg_re.log().to(rdtype).repeat(H, 1).to(device))
        self.im = nn.Parameter(d.Lambda.imag.to(rdtype).repeat(H, 1).to(device))
        self.P = _real_param(d.P.to(cdtype).repeat(H, 1, 1).to(device))  # (H, M, r, 2)
        self.B = _real_param(d.B.to(cdtype).repeat(H, 1).to(device))  # (H, M, 2)
        c = 2 if bidirectional else 1
        C = torch.randn(H, c, N // 2, dtype=cdtype, device=device)  # unit variance complex
        self.C = nn.Parameter(torch.view_as_real(C))  # (H, c, M, 2)

    def _lambda(self) -> Tensor:
        return torch.complex(-torch.exp(self.log_neg_re), self.im)  # (H, M)

    def kernel(self, L: int) -> Tensor:
        if L > self.l_max:
            raise ValueError(f"S4: input length {L} exceeds l_max={self.l_max}; build the layer "
                             f"with l_max >= {L}")
        dt = torch.exp(self.log_dt)  # (H,)
        args = [self._lambda()[:, None], _complex(self.P)[:, None], _complex(self.B)[:, None],
                _complex(self.C)]  # (H, 1, M), (H, 1, M, r), (H, 1, M), (H, c, M)
        wide = self.wide_kernel
        if wide is None:
            wide = self.log_dt.device.type == "cpu"
        if wide:
            args = [t.to(torch.complex128) for t in args]
            dt = dt.to(torch.float64)
        K = kernel_dplr(*args, dt[:, None], self.l_max, self.method, conj=True,
                        tilde=True)  # (H, c, l_max)
        return K[..., :L].transpose(0, 1).to(self.log_dt.dtype)  # (c, H, L)

    def _real_system(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The real (A, B, C~) of each channel in float64, and dt: the conjugate pairs
        x_f = [x, conj x] mapped to [sqrt2 Re x, sqrt2 Im x] by the unitary T."""
        Lam = self._lambda().to(torch.complex128)  # (H, M)
        P = _complex(self.P).to(torch.complex128)  # (H, M, r)
        B = _complex(self.B).to(torch.complex128)  # (H, M)
        Ct = _complex(self.C).to(torch.complex128)[:, 0]  # (H, M)
        Lf = torch.cat([Lam, Lam.conj()], -1)  # (H, N)
        Pf = torch.cat([P, P.conj()], -2)  # (H, N, r)
        Af = torch.diag_embed(Lf) - Pf @ Pf.conj().transpose(-1, -2)  # (H, N, N)
        Bf = torch.cat([B, B.conj()], -1)  # (H, N)
        Cf = torch.cat([Ct, Ct.conj()], -1)  # (H, N)
        M = Lam.shape[-1]
        eye = torch.eye(M, dtype=torch.complex128, device=Lam.device)
        T = torch.cat([torch.cat([eye, eye], 1), torch.cat([-1j * eye, 1j * eye], 1)], 0)
        T = T / math.sqrt(2)  # (N, N) unitary
        Th = T.conj().T
        Ar = (T @ Af @ Th).real  # (H, N, N)
        Br = (Bf @ T.T).real  # (H, N): T Bf
        Cr = (Cf @ Th).real  # (H, N)
        return Ar, Br, Cr, torch.exp(self.log_dt).to(torch.float64)

    def _step_matrices(self) -> tuple[Tensor, Tensor, Tensor]:
        """Dense real Ab (H, N, N), Bb (H, N) and C (H, N), computed in float64."""
        Ar, Br, Ct, dt = self._real_system()
        Ab, Bb = discretize(Ar, Br, dt, self.method)  # (H, N, N), (H, N)
        AbL = torch.linalg.matrix_power(Ab, self.l_max)
        eye = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device)
        # C (I - Ab^L) = C~  =>  C = C~ (I - Ab^L)^-1
        C = torch.linalg.solve((eye - AbL).transpose(-1, -2), Ct[..., None])[..., 0]  # (H, N)
        dtype = self.log_dt.dtype
        return Ab.to(dtype), Bb.to(dtype), C.to(dtype)

    def setup_step(self) -> None:
        self._check_causal("setup_step")
        with torch.no_grad():
            self._Ab, self._Bb, self._Cs = self._step_matrices()
        self._step_ready = True

    def default_state(self, batch: int) -> Tensor:
        _check_int("S4", "batch", batch)
        return torch.zeros(batch, self.d_model, self.d_state, dtype=self.log_dt.dtype,
                           device=self.log_dt.device)

    def _step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        state = (self._Ab @ state[..., None])[..., 0] + self._Bb * x_t[..., None]  # (B, H, N)
        y = (state * self._Cs).sum(-1) + self.D * x_t  # (B, H)
        return y, state

    def _recurrent(self, x: Tensor) -> Tensor:
        self._check_causal("mode='recurrent'")
        Ab, Bb, C = self._step_matrices()  # differentiable: the scan path trains too
        y, _ = ssm_scan(Ab, Bb, C, x)  # (B, H, L)
        return y + self.D[:, None] * x

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", l_max={self.l_max}, measure={self.measure!r}, "
                f"method={self.method!r}")


class S4D(_SSMLayer):
    """S4D: per-channel diagonal SSMs, kernel by a Vandermonde product, any input length.

    Parameters: ``log_dt`` (H,); Lambda = -exp(``log_neg_re``) + i ``im`` (H, M); ``B``
    (H, M) and ``C`` (H, c, M) complex (stored as (..., 2) real pairs); ``D`` (H,). The
    output is 2 Re(C x) + D u, x the M complex modes (a real system of size N = 2M).

    Args:
        d_model: H; d_state: N (even).
        init: ``"lin"`` (S4D-Lin, default), ``"inv"`` (S4D-Inv) or ``"legs"`` (S4D-LegS); see
            ``s4d_init``.
        method: discretisation, ``"zoh"`` (default) or any of ``paraseq.ssm.METHODS``.
        dt_min: as for ``S4``.
        dt_max: as for ``S4``.
        bidirectional: as for ``S4``.
        transposed: as for ``S4``.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, init: str = "lin",
                 method: str = "zoh", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 bidirectional: bool = False, transposed: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        from ..ssm.discretize import _check_method

        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self._init_common(d_model, d_state, dt_min, dt_max, bidirectional, transposed, factory)
        self.method = _check_method("S4D", method)
        self.init = init
        H, N = d_model, d_state
        lam, B = s4d_init(N, init)
        rdtype = factory["dtype"]
        cdtype = torch.complex64 if rdtype == torch.float32 else torch.complex128
        self.log_neg_re = nn.Parameter((-lam.real).log().to(rdtype).repeat(H, 1).to(device))
        self.im = nn.Parameter(lam.imag.to(rdtype).repeat(H, 1).to(device))
        self.B = _real_param(B.to(cdtype).repeat(H, 1).to(device))  # (H, M, 2)
        c = 2 if bidirectional else 1
        C = torch.randn(H, c, N // 2, dtype=cdtype, device=device)
        self.C = nn.Parameter(torch.view_as_real(C))  # (H, c, M, 2)

    def _lambda(self) -> Tensor:
        return torch.complex(-torch.exp(self.log_neg_re), self.im)  # (H, M)

    def kernel(self, L: int) -> Tensor:
        dt = torch.exp(self.log_dt)  # (H,)
        K = kernel_diagonal(self._lambda()[:, None], _complex(self.B)[:, None],
                            _complex(self.C), dt[:, None], L, self.method, conj=True)  # (H,c,L)
        return K.transpose(0, 1)  # (c, H, L)

    def _discrete(self) -> tuple[Tensor, Tensor, Tensor]:
        Ab, Bb = discretize_diagonal(self._lambda(), _complex(self.B), torch.exp(self.log_dt),
                                     self.method)  # (H, M) each
        return Ab, Bb, _complex(self.C)[:, 0]

    def setup_step(self) -> None:
        self._check_causal("setup_step")
        with torch.no_grad():
            self._Ab, self._Bb, self._Cs = self._discrete()
        self._step_ready = True

    def default_state(self, batch: int) -> Tensor:
        _check_int("S4D", "batch", batch)
        cdtype = torch.complex64 if self.log_dt.dtype == torch.float32 else torch.complex128
        return torch.zeros(batch, self.d_model, self.d_state // 2, dtype=cdtype,
                           device=self.log_dt.device)

    def _step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        state = self._Ab * state + self._Bb * x_t[..., None]  # (B, H, M)
        y = 2 * (state * self._Cs).sum(-1).real + self.D * x_t  # (B, H)
        return y, state

    def _recurrent(self, x: Tensor) -> Tensor:
        self._check_causal("mode='recurrent'")
        Ab, Bb, C = self._discrete()  # differentiable: the scan path trains too
        y, _ = ssm_scan(Ab, Bb, C, x, conj=True)  # (B, H, L)
        return y + self.D[:, None] * x

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.init!r}, method={self.method!r}"


class S4Block(nn.Module):
    """The S4 paper's residual block: x + Dropout(GLU(Linear(Dropout(act(SSM(norm(x))))))).

    Args:
        d_model: H.
        layer: ``"s4"`` (default) or ``"s4d"``; further keyword arguments go to that layer.
        dropout: dropout probability after the activation and after the gated output.
        activation: ``"gelu"`` (default), ``"relu"``, ``"silu"`` or ``"identity"``.
        prenorm: LayerNorm before the layer (default) or after the residual sum.
        norm: False drops the LayerNorm altogether (it rescales every time step to unit size,
            which keeps a model from learning to silence an input).

    Input and output (B, L, H). ``setup_step`` / ``default_state`` / ``step`` run it one
    step at a time (everything but the SSM is pointwise in time).
    """

    _ACTIVATIONS: ClassVar[dict[str, type[nn.Module]]] = {
        "gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}

    def __init__(self, d_model: int, *, layer: str = "s4", dropout: float = 0.0,
                 activation: str = "gelu", prenorm: bool = True, norm: bool = True,
                 **layer_kwargs):
        super().__init__()
        if layer not in ("s4", "s4d"):
            raise ValueError(f"S4Block: layer must be 's4' or 's4d'; got {layer!r}")
        if activation not in self._ACTIVATIONS:
            raise ValueError(f"S4Block: unknown activation {activation!r}; valid: "
                             + ", ".join(repr(a) for a in self._ACTIVATIONS))
        if layer_kwargs.get("transposed"):
            raise ValueError("S4Block: works on (B, L, H) (its LayerNorm and output Linear act on "
                             "the last dim); transposed=True is not supported: pass "
                             "x.transpose(1, 2) and transpose the output back")
        factory = {k: layer_kwargs[k] for k in ("device", "dtype") if k in layer_kwargs}
        self.ssm = (S4 if layer == "s4" else S4D)(d_model, **layer_kwargs)
        self.norm = nn.LayerNorm(d_model, **factory) if norm else nn.Identity()
        self.activation = self._ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(d_model, 2 * d_model, **factory)
        self.prenorm = prenorm

    def _tail(self, x: Tensor, z: Tensor) -> Tensor:
        z = self.dropout(self.activation(z))
        z = self.dropout(F.glu(self.output_linear(z), dim=-1))
        x = x + z
        return x if self.prenorm else self.norm(x)

    def forward(self, x: Tensor, *, mode: str = "convolution") -> Tensor:
        """x (B, L, H) -> (B, L, H)."""
        z = self.norm(x) if self.prenorm else x
        return self._tail(x, self.ssm(z, mode=mode))

    def setup_step(self) -> None:
        self.ssm.setup_step()

    def default_state(self, batch: int) -> Tensor:
        return self.ssm.default_state(batch)

    def step(self, x_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """x_t (B, H) -> (y_t (B, H), new state)."""
        z = self.norm(x_t) if self.prenorm else x_t
        z, state = self.ssm.step(z, state)
        return self._tail(x_t, z), state
