"""Published test accuracies for a dataset, read offline from the reference results aeon ships.

aeon's package holds, for its own tests, copies of the reference results of
timeseriesclassification.com (``aeon/testing/example_results_files/classification/accuracy/``:
HC2, InceptionTime, FreshPRINCE and WEASEL-2.0 on the univariate UCR datasets (112; 142 for
WEASEL-2.0), 30 resamples each, resample 0 being the dataset's default train/test split;
aeon's tests check them against the website's files). Nothing is downloaded: a dataset
without a row there (the multivariate and the variable-length ones among aeon's bundled
datasets) has no published figures here.

These are quoted, not reproduced: the estimators ran in their authors' experiments (the
UCR results of Middlehurst, Schäfer and Bagnall, "Bake off redux", arXiv:2304.13029, 2023).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ESTIMATORS", "Published", "published"]

ESTIMATORS = ("HC2", "InceptionTime", "FreshPRINCE", "WEASEL-2.0")
SOURCE = ("timeseriesclassification.com reference results, as shipped in aeon's "
          "testing/example_results_files")


@dataclass(frozen=True)
class Published:
    """One estimator's test accuracy on one dataset: on the default train/test split
    (resample 0), and the mean and standard deviation over all resamples."""

    estimator: str
    default_split: float
    mean: float
    std: float
    resamples: int


def _folder() -> Path | None:
    try:
        import aeon
    except ImportError:
        return None
    path = Path(aeon.__file__).parent / "testing" / "example_results_files" / \
        "classification" / "accuracy"
    return path if path.is_dir() else None


def published(dataset: str) -> list[Published]:
    """The published accuracies aeon ships for ``dataset`` (an empty list where it ships
    none, or where aeon is not installed)."""
    folder = _folder()
    out: list[Published] = []
    if folder is None:
        return out
    for est in ESTIMATORS:
        path = folder / f"{est}_accuracy.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if row and row[0] == dataset:
                    accs = [float(v) for v in row[1:] if v.strip() not in ("", "nan")]
                    if accs and all(math.isfinite(a) and 0 <= a <= 1 for a in accs):
                        out.append(Published(
                            est, accs[0], statistics.mean(accs),
                            statistics.stdev(accs) if len(accs) > 1 else 0.0, len(accs)))
                    break
    return out


def describe(dataset: str) -> str:
    """One line for the command line: the published accuracies, or that none ship."""
    figures = published(dataset)
    if not figures:
        return (f"published accuracies for {dataset}: none ship offline with aeon (its "
                f"reference files cover univariate equal-length UCR datasets only)")
    parts = ", ".join(f"{p.estimator} {p.default_split:.3f} (mean {p.mean:.3f} +- {p.std:.3f}"
                      f" over {p.resamples} resamples)" for p in figures)
    return f"published accuracies for {dataset}, default split ({SOURCE}; quoted): {parts}"
