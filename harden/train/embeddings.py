"""Reading class embeddings (embeddings.npz from `harden embed`) for the text head.

The file's rows follow its own class list; a dataset may order its classes
differently, so rows are matched to the dataset's classes by name, never by
position, and a missing class is refused rather than silently given a wrong row.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harden.errors import HardenError
from harden.files import sha256_file


@dataclass
class ClassEmbeddings:
    """C×E float32 unit rows in the order of `classes`, with the file's hash for provenance."""

    classes: list[str]
    embeddings: np.ndarray
    sha256: str
    encoder: str = ""

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def aligned_to(self, classes: list[str]) -> np.ndarray:
        """Rows reordered to `classes` (the dataset's order), refusing missing names."""
        index = {name: i for i, name in enumerate(self.classes)}
        missing = [c for c in classes if c not in index]
        if missing:
            raise HardenError(
                f"embeddings have no row for classes {missing[:5]}{'…' if len(missing) > 5 else ''}; "
                f"embed the dataset's class names (they have {len(self.classes)}: {self.classes[:5]}…)"
            )
        return np.ascontiguousarray(self.embeddings[[index[c] for c in classes]], dtype=np.float32)


def load_class_embeddings(path: str | os.PathLike[str]) -> ClassEmbeddings:
    """Load and validate embeddings.npz (keys `classes`, `embeddings`; optional `encoder`)."""
    path = Path(path)
    if not path.is_file():
        raise HardenError(f"{path}: no such embeddings file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "classes" not in data or "embeddings" not in data:
                raise HardenError(f"{path}: not an embeddings.npz (needs 'classes' and 'embeddings', "
                                  f"found {sorted(data.files)})")
            classes = [str(c) for c in data["classes"]]
            emb = np.asarray(data["embeddings"], dtype=np.float32)
            encoder = str(data["encoder"]) if "encoder" in data else ""
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise HardenError(f"{path}: not a readable embeddings.npz ({err})") from err
    if emb.ndim != 2 or emb.shape[0] != len(classes) or emb.shape[0] == 0:
        raise HardenError(f"{path}: embeddings of shape {emb.shape} do not fit {len(classes)} class names")
    if not np.all(np.isfinite(emb)):
        raise HardenError(f"{path}: embeddings contain NaN or Inf")
    norms = np.linalg.norm(emb, axis=1)
    if np.any(norms < 1e-6):
        raise HardenError(f"{path}: some embedding rows are zero")
    emb = emb / norms[:, None]
    return ClassEmbeddings(classes=classes, embeddings=emb.astype(np.float32), sha256=sha256_file(path),
                           encoder=encoder)
