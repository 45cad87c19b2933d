"""Training on real data: aeon's bundled UCR/UEA time series classification datasets, a
recurrent (or S4, or linear-attention) classifier solved by paraseq (or torch.nn's own
modules, from the same initial weights), with early stopping, metrics, atomic checkpoints and
exact resume.
``python -m paraseq train`` is its command line. aeon is optional: pip install 'paraseq[data]'.
"""

from .data import Dataset, Split, available, from_arrays, load
from .loop import CheckpointError, Config, plot, run
from .model import MODELS, TRAIN_METHODS, Classifier
from .published import Published, published

__all__ = ["MODELS", "TRAIN_METHODS", "CheckpointError", "Classifier", "Config", "Dataset",
           "Published", "Split", "available", "from_arrays", "load", "plot", "published", "run"]
