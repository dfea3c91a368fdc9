"""Class embeddings (embeddings.npz from `harden embed`) aligned to a dataset's label order.

The file's rows follow its own class list; a dataset may order its classes
differently, so rows are matched to the dataset's classes by name, never by
position, and a missing class is refused rather than silently given a wrong row.
Reading and validating the file is `harden.text.embeddings.load_embeddings`.
"""

from __future__ import annotations

import os

import numpy as np

from harden.errors import HardenError


def load_aligned_embeddings(path: str | os.PathLike[str], classes: list[str],
                            named: bool = True) -> tuple[np.ndarray, str]:
    """(C×E float32 unit rows in `classes` order, SHA-256 of the file); `named` False: the dataset's class
    names are placeholders, which no row can match, so the user is told how to name them."""
    from harden.text.embeddings import load_embeddings

    loaded = load_embeddings(path)
    index = {name: i for i, name in enumerate(loaded.classes)}
    missing = [c for c in classes if c not in index]
    if missing and not named:
        raise HardenError(
            f"the dataset names no classes, so rows of {path} cannot be matched to its labels: store the class "
            f"names in label order in the .npz as an array 'classes' (the file has {loaded.classes[:5]}…)"
        )
    if missing:
        raise HardenError(
            f"{path}: no row for classes {missing[:5]}{'…' if len(missing) > 5 else ''}; embed the dataset's "
            f"class names (the file has {len(loaded.classes)}: {loaded.classes[:5]}…)"
        )
    matrix = np.ascontiguousarray(loaded.matrix[[index[c] for c in classes]], dtype=np.float32)
    return matrix, loaded.sha256
