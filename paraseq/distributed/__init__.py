"""Sequence parallelism over torch.distributed: the time dim split across ranks.

Every function here is called at once on every rank of a process group (gloo on CPUs, NCCL on
GPUs), each rank with its own consecutive slice of the time dim, rank 0 holding the first
steps; each returns its rank's slice of the single-process result.
"""

from ._comm import PeerError
from .nn import SequenceParallel
from .ode import odeint
from .scan import linear_scan
from .solve import solve_recurrence

__all__ = ["PeerError", "SequenceParallel", "linear_scan", "odeint", "solve_recurrence"]
