"""The recurrent modules' argument checks, in torch.nn's words.

A mistake raises what torch.nn raises for it, with torch.nn's message first (tests and user
code match it by regex) and paraseq's hint after it in parentheses. Where torch.nn raises
RuntimeError for a bad input, paraseq raises ``RNNInputError``, which is a RuntimeError and a
ValueError both: ``except RuntimeError`` (torch's contract) and ``except ValueError``
(paraseq's: bad input is a ValueError) catch it alike.

Shape letters: T time, B batch, n input size, L layers, Dn directions.
"""

from __future__ import annotations

import numbers
import warnings

from torch import Tensor

__all__ = ["RNNInputError", "check_constructor", "check_hx", "check_input"]


class RNNInputError(RuntimeError, ValueError):
    """A bad input to a recurrent module: torch.nn raises RuntimeError for it (message first,
    word for word), paraseq's contract a ValueError; this is both."""


def _int(name: str, value: object, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__} ({owner}: "
                        f"{name}={value!r}; pass an int)")
    return int(value)


def check_constructor(owner: str, mode: str, input_size, hidden_size, num_layers, bias,
                      batch_first, dropout, proj_size) -> tuple[int, int, int, int, float]:
    """torch.nn.RNNBase's checks, in its order and words: (input_size, hidden_size,
    num_layers, proj_size, dropout) as Python numbers. Warns, as torch does, when dropout
    cannot act (one layer)."""
    if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Number)
            or not 0 <= dropout <= 1):
        raise ValueError(f"dropout should be a number in range [0, 1] representing the "
                         f"probability of an element being zeroed ({owner}: got "
                         f"dropout={dropout!r})")
    if dropout > 0 and num_layers == 1:
        warnings.warn(f"dropout option adds dropout after all but last recurrent layer, so "
                      f"non-zero dropout expects num_layers greater than 1, but got "
                      f"dropout={dropout} and num_layers={num_layers} ({owner}: dropout acts "
                      f"between layers)", UserWarning, stacklevel=4)
    for name, v in (("bias", bias), ("batch_first", batch_first)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(v).__name__} ({owner}: "
                            f"{name}={v!r}; pass True or False)")
    input_size = _int("input_size", input_size, owner)
    if input_size <= 0:
        raise ValueError(f"input_size must be greater than zero ({owner}: got "
                         f"input_size={input_size}; the number of features of x_t)")
    hidden_size = _int("hidden_size", hidden_size, owner)
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be greater than zero ({owner}: got "
                         f"hidden_size={hidden_size}; the number of features of h_t)")
    num_layers = _int("num_layers", num_layers, owner)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be greater than zero ({owner}: got "
                         f"num_layers={num_layers})")
    proj_size = _int("proj_size", proj_size, owner)
    if proj_size < 0:
        raise ValueError(f"proj_size should be a positive integer or zero to disable "
                         f"projections ({owner}: got proj_size={proj_size})")
    if proj_size and mode != "LSTM":
        raise ValueError(proj_size_error(owner))
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size ({owner}: got "
                         f"proj_size={proj_size}, hidden_size={hidden_size})")
    return input_size, hidden_size, num_layers, proj_size, float(dropout)


def proj_size_error(owner: str) -> str:
    return (f"proj_size argument is only supported for LSTM, not RNN or GRU ({owner}: "
            f"paraseq.nn.LSTM(..., proj_size=P) projects its state)")


def check_input(owner: str, x: object, input_size: int, weight: Tensor, packed: bool) -> Tensor:
    """The input (or a PackedSequence's data) against the module: dimensions, feature size,
    dtype and device, in torch's words."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor or a PackedSequence; got "
                        f"{type(x).__name__}")
    if packed:
        if x.dim() != 2:
            raise RNNInputError(f"input must have 2 dimensions, got {x.dim()} ({owner}: a "
                                f"PackedSequence's data is (sum of lengths, n))")
    elif x.dim() not in (2, 3):
        tensor = " tensor" if owner == "RNN" else ""
        raise ValueError(f"{owner}: Expected input to be 2D or 3D, got {x.dim()}D{tensor} "
                         f"instead (input is (T, B, n), (B, T, n) with batch_first=True, or "
                         f"unbatched (T, n); got shape {tuple(x.shape)})")
    if x.dtype != weight.dtype:
        raise ValueError(f"RNN input dtype ({x.dtype}) does not match weight dtype "
                         f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                         f"convert model: model.to({x.dtype}) ({owner})")
    if x.shape[-1] != input_size:
        raise RNNInputError(f"input.size(-1) must be equal to input_size. Expected "
                            f"{input_size}, got {x.shape[-1]} ({owner}: input_size="
                            f"{input_size} features per step; got shape {tuple(x.shape)})")
    if x.device != weight.device:
        raise RNNInputError(f"Expected all tensors to be on the same device, but found input "
                            f"on {x.device} and weights on {weight.device} ({owner}: move one, "
                            f"e.g. module.to(input.device))")
    return x


def check_length(owner: str, T: int) -> None:
    if T == 0:
        raise RNNInputError(f"Expected sequence length to be larger than 0 in RNN ({owner}: "
                            f"the input has no time step; give it at least one time step)")


def check_hx(owner: str, lstm: bool, hx, want: tuple[tuple[int, int, int], ...], batched: bool,
             like: Tensor) -> tuple[Tensor, ...]:
    """hx in forward's format against the expected (L Dn, B, size) shapes ``want`` (one, or
    (h, c) for LSTM): a tuple of 3-D tensors (an unbatched 2-D hx gets its batch dimension)."""
    if lstm:
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2
                and all(isinstance(t, Tensor) for t in hx)):
            raise TypeError(f"{owner}: hx must be a tuple (h_0, c_0) of two tensors or None; "
                            f"got {type(hx).__name__}")
        parts = tuple(hx)
    else:
        if not isinstance(hx, Tensor):
            raise TypeError(f"{owner}: hx must be a torch.Tensor or None; got "
                            f"{type(hx).__name__}")
        parts = (hx,)
    dims = 3 if batched else 2
    kind = "batched 3-D" if batched else "unbatched 2-D"
    if any(p.dim() != dims for p in parts):
        if lstm:
            got = ", ".join(f"{p.dim()}-D" for p in parts)
            raise RNNInputError(f"For {kind} input, hx and cx should also be {dims}-D but got "
                                f"({got}) tensors ({owner}: (h_0, c_0) each (num_layers * "
                                f"num_directions{', batch' if batched else ''}, size))")
        raise RNNInputError(f"For {kind} input, hx should also be {dims}-D but got "
                            f"{parts[0].dim()}-D tensor ({owner}: hx is (num_layers * "
                            f"num_directions{', batch' if batched else ''}, hidden size))")
    parts = parts if batched else tuple(p.unsqueeze(1) for p in parts)
    names = ("h_0", "c_0") if lstm else ("hx",)
    for i, (p, shape) in enumerate(zip(parts, want, strict=True)):
        if tuple(p.shape) != shape:
            label = f"hidden[{i}]" if lstm else "hidden"
            raise RNNInputError(f"Expected {label} size {shape}, got {list(p.shape)} ({owner}: "
                                f"{names[i]} must have shape {shape}: (num_layers * "
                                f"num_directions, batch, size))")
        if p.dtype != like.dtype:
            raise RNNInputError(f"Expected hx dtype to match input dtype ({like.dtype}), got "
                                f"{p.dtype} ({owner}: convert hx, e.g. "
                                f"hx.to({like.dtype}))")
        if p.device != like.device:
            raise RNNInputError(f"Expected all tensors to be on the same device, but found "
                                f"hx on {p.device} and input on {like.device} ({owner})")
    return parts
