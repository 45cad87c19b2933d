"""Structured state space models: HiPPO matrices, discretisation, S4 and S4D kernels.

The layers built on these are ``paraseq.nn.S4`` and ``paraseq.nn.S4D``.
"""

from .discretize import METHODS, discretize, discretize_diagonal
from .hippo import (
    DPLR,
    MEASURES,
    dplr,
    hippo,
    hippo_basis,
    hippo_reconstruct,
    hippo_states,
    rank_correction,
    s4d_init,
)
from .kernels import (
    cauchy,
    causal_conv,
    kernel_diagonal,
    kernel_dplr,
    kernel_naive,
    ssm_scan,
    vandermonde,
)

__all__ = [
    "DPLR",
    "MEASURES",
    "METHODS",
    "cauchy",
    "causal_conv",
    "discretize",
    "discretize_diagonal",
    "dplr",
    "hippo",
    "hippo_basis",
    "hippo_reconstruct",
    "hippo_states",
    "kernel_diagonal",
    "kernel_dplr",
    "kernel_naive",
    "rank_correction",
    "s4d_init",
    "ssm_scan",
    "vandermonde",
]
