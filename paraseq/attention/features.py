"""Similarity functions of linear attention, as feature maps phi: sim(q, k) = phi(q) . phi(k).

Shape letters as in ``naive``; d the size of the raw queries and keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def elu1(x: Tensor) -> Tensor:
    """elu(x) + 1 (Katharopoulos et al. 2020): positive, so the normaliser never vanishes."""
    return F.elu(x).add_(1)  # elu's backward reads its input, not its result


def relu(x: Tensor) -> Tensor:
    return F.relu(x)


def identity(x: Tensor) -> Tensor:
    """No map (RetNet, GLA): sim(q, k) = q . k, sign-indefinite; use it without normaliser."""
    return x


def taylor(x: Tensor) -> Tensor:
    """[1, x / |x|] (d + 1 features): phi(q) . phi(k) = 1 + q_n . k_n, the first-order Taylor
    expansion of exp(q_n . k_n); never negative, as |q_n . k_n| <= 1."""
    xn = F.normalize(x, dim=-1)  # (..., d)
    return torch.cat([torch.ones_like(xn[..., :1]), xn], dim=-1)  # (..., d + 1)


def softmax_query(x: Tensor) -> Tensor:
    """Softmax over the features (Shen et al., "efficient attention"), queries' half."""
    return torch.softmax(x, dim=-1)


def softmax_key(x: Tensor) -> Tensor:
    """Softmax over the sequence (dim -2), keys' half: needs every key, so not causal."""
    return torch.softmax(x, dim=-2)


# name -> (phi for queries, phi for keys); "linformer" is no feature map (see api)
FEATURE_MAPS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "elu1": (elu1, elu1),
    "relu": (relu, relu),
    "identity": (identity, identity),
    "taylor": (taylor, taylor),
    "softmax": (softmax_query, softmax_key),
}
NON_CAUSAL = ("softmax", "linformer")  # similarities that need the whole sequence
