"""Will parallel pay? Lyapunov exponents of a recurrence and the iterations each parallel
method needs, measured before (or instead of) trusting a solve."""

from .lle import JACOBIANS, LyapunovResult, lyapunov

__all__ = ["JACOBIANS", "LyapunovResult", "lyapunov"]
