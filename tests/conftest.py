import os
import sys

import torch

try:
    from hypothesis import settings
except ImportError:  # a bare GPU machine (benchmarks/gpu.py runs -m cuda there): only the
    settings = None  # test files that use hypothesis fail to collect, not the whole run

# triton's interpreter runs tests/test_triton.py's kernels on a machine without a GPU; triton
# reads this when it is first imported, which other tests (torch.compile's) may do first
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests import their independent references (reference.py) by name
sys.path.insert(0, os.path.dirname(__file__))

# CI runs a fixed set of hypothesis examples (derandomize: the same draws every run, so a red
# run is reproducible and a green one stays green); local runs keep exploring new ones
if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")
