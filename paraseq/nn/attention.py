"""Linear attention layers: multi-head ``LinearAttention`` and a causal Transformer block.

Shape letters: B batch, T time steps, E embedding size, H heads, Dh size per head, K feature
size (Dh, or Dh + 1 for the taylor map), V' the state's value columns (Dh, + 1 when
normalising).

Training runs the chunked (or, short, the parallel) form over the whole sequence; decoding
calls ``step`` once per token with the state, O(H K V') per token whatever the position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import last_form, linear_attention
from ..attention.api import SIMILARITIES

GATES = (None, "decay", "scalar", "gla")


class LinearAttention(nn.Module):
    """Multi-head causal linear attention with a matrix state per head.

    Args:
        embed_dim: E, the size of the input and output features.
        num_heads: H.
        feature_map: ``"elu1"``, ``"relu"``, ``"identity"`` or ``"taylor"`` (the causal maps of
            ``paraseq.attention.linear_attention``).
        gate: None (plain linear attention); ``"decay"``: a fixed decay per head,
            1 - 2^(-5 - h) (RetNet); ``"scalar"``: a data-dependent decay per head and step
            (Mamba-2-like); ``"gla"``: a data-dependent decay per key feature (GLA). Learned
            gates are sigmoid(W x)^(1/16), GLA's parameterisation (close to 1 at start).
        normalize: divide by the attention weights' sum; None: True unless the map is
            "identity".
        head_norm: RMS-normalise each head's output before the output projection (RetNet and
            GLA do, as their outputs are not normalised); None: True when not normalising.
        bias: biases in the projections.
        form: passed to ``linear_attention`` (``"auto"`` picks by length and device); the
            attribute ``last_form`` reads the form the latest forward ran.
        chunk_size: passed to ``linear_attention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, feature_map: str = "elu1",
                 gate: str | None = None, normalize: bool | None = None,
                 head_norm: bool | None = None, bias: bool = False, form: str = "auto",
                 chunk_size: int = 64, device=None, dtype=None) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"LinearAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        if feature_map not in SIMILARITIES or feature_map in ("softmax", "linformer"):
            raise ValueError(f"LinearAttention: feature_map must be one of 'elu1', 'relu', "
                             f"'identity', 'taylor' (causal); got {feature_map!r}")
        if gate not in GATES:
            raise ValueError(f"LinearAttention: gate must be one of {GATES}; got {gate!r}")
        if feature_map == "taylor" and gate == "gla":
            raise ValueError("LinearAttention: gate='gla' gates the key features, which "
                             "feature_map='taylor' does not keep; use gate='scalar'")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.feature_map, self.gate_kind, self.form, self.chunk_size = (
            feature_map, gate, form, chunk_size)
        self.normalize = feature_map != "identity" if normalize is None else normalize
        self.last_form = ""  # the form the latest forward ran (paraseq.attention.last_form)
        self.head_norm = (not self.normalize) if head_norm is None else head_norm
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if gate == "decay":
            h = torch.arange(num_heads, dtype=torch.float64)
            self.register_buffer("decay", (1 - 2.0 ** (-5 - h)).to(dtype or torch.float32))
        elif gate == "scalar":
            self.g_proj = nn.Linear(embed_dim, num_heads, bias=True, **fk)
        elif gate == "gla":
            self.g_proj = nn.Linear(embed_dim, embed_dim, bias=True, **fk)

    def _gate(self, x: Tensor) -> Tensor | None:
        if self.gate_kind in ("scalar", "gla"):
            B, T, _ = x.shape
            logit = self.g_proj(x)  # (B, T, H) or (B, T, E)
            g = (F.logsigmoid(logit) / 16).exp()  # in (0, 1)
            return g if self.gate_kind == "scalar" else g.view(B, T, self.num_heads, -1)
        return None

    def forward(self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False,
                cu_seqlens: Tensor | None = None, form: str | None = None
                ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, E) -> (B, T, E); ``state`` (B, H, K, V') continues a sequence;
        with return_state, also the final state (B, H, K, V')."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"LinearAttention: x must be (B, T, {self.embed_dim}); got "
                             f"{tuple(x.shape)}")
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, -1)  # (B, T, H, Dh)
        k = self.k_proj(x).view(B, T, H, -1)  # (B, T, H, Dh)
        v = self.v_proj(x).view(B, T, H, -1)  # (B, T, H, Dh)
        o, S = linear_attention(
            q, k, v, feature_map=self.feature_map, normalize=self.normalize,
            decay=self.decay if self.gate_kind == "decay" else None, gate=self._gate(x),
            form=form or self.form, chunk_size=self.chunk_size, initial_state=state,
            return_state=True, cu_seqlens=cu_seqlens, layout="bthd")  # (B, T, H, Dh)
        self.last_form = last_form()
        if self.head_norm:
            o = F.rms_norm(o, (o.shape[-1],))
        y = self.out_proj(o.reshape(B, T, self.embed_dim))  # (B, T, E)
        return (y, S) if return_state else y

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token: x (B, E) and the state (B, H, K, V') (None: the start) -> (y (B, E),
        the new state). The recurrent form: O(1) in the position."""
        y, S = self.forward(x[:, None], state, return_state=True, form="recurrent")
        return y[:, 0], S

    def extra_repr(self) -> str:
        return (f"{self.embed_dim}, num_heads={self.num_heads}, feature_map="
                f"{self.feature_map!r}, gate={self.gate_kind!r}, normalize={self.normalize}")


class LinearTransformerBlock(nn.Module):
    """A pre-norm causal Transformer block: x + attn(LN(x)), then + MLP(LN(.)), with
    ``LinearAttention`` as its attention (keyword arguments go to it). ``step`` decodes."""

    def __init__(self, embed_dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, device=None, dtype=None, **attention_kwargs) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        hidden = math.ceil(mlp_ratio * embed_dim)
        self.norm1 = nn.LayerNorm(embed_dim, **fk)
        self.attn = LinearAttention(embed_dim, num_heads, **fk, **attention_kwargs)
        self.norm2 = nn.LayerNorm(embed_dim, **fk)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden, **fk), nn.GELU(),
                                 nn.Linear(hidden, embed_dim, **fk), nn.Dropout(dropout))

    def forward(self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False,
                form: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, E) -> (B, T, E) (and the attention's final state)."""
        a, S = self.attn(self.norm1(x), state, return_state=True, form=form)
        h = x + a  # (B, T, E)
        y = h + self.mlp(self.norm2(h))  # (B, T, E)
        return (y, S) if return_state else y

    def step(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token x (B, E) -> (y (B, E), the new state)."""
        y, S = self.forward(x[:, None], state, return_state=True, form="recurrent")
        return y[:, 0], S
