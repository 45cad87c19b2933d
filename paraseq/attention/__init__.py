"""Linear attention as a recurrence with a matrix state, in three equal forms.

``linear_attention`` is the entry point. One folder per op family, in
flash-linear-attention's spirit: ``naive`` (the float64 loop, the reference), ``parallel``
(the masked quadratic product), ``recurrent`` (the step; decoding) and ``chunked`` (quadratic
inside chunks, a scan across them; ``chunked_triton`` the same as Triton kernels), all with
one signature
``(q, k, v, log_g=None, initial_state=None, causal=True) -> (o, final_state)``.
"""

from .api import FORMS, LAYOUTS, SIMILARITIES, choose_form, last_form, linear_attention
from .chunked import chunked_attention
from .chunked_triton import triton_attention
from .features import FEATURE_MAPS
from .naive import naive_attention, naive_linformer
from .parallel import parallel_attention
from .recurrent import recurrent_attention, recurrent_step

__all__ = ["FEATURE_MAPS", "FORMS", "LAYOUTS", "SIMILARITIES", "choose_form",
           "chunked_attention", "last_form", "linear_attention", "naive_attention",
           "naive_linformer", "parallel_attention", "recurrent_attention", "recurrent_step",
           "triton_attention"]
