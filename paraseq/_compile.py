"""``eager``: ``torch.compiler.disable`` without importing torch._dynamo when paraseq is
imported.

``torch.compiler.disable(fn)`` imports Dynamo (about 2.5 s of the 4 s that ``import paraseq``
took, measured with ``python -X importtime``). ``eager(fn)`` returns a wrapper that calls fn
directly while Dynamo has never been imported (nothing can be compiling then), and otherwise
calls ``torch.compiler.disable(fn)``, made on first need: under torch.compile the call is a
graph break and fn runs eagerly, exactly as with the decorator applied at import.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``torch.compiler.disable(fn)``, applied lazily (see the module docstring)."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not disabled:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]
