"""Class embeddings: one unit vector per class, the mean of its normalised description embeddings.

embeddings.npz holds `classes` (str, label order), `embeddings` (C×E float32,
unit rows), `encoder` (the encoder id) and `source_sha256` (the descriptions'
content hash). It is written with fixed zip timestamps, so the same descriptions
and encoder give the same bytes, and the file's SHA-256, which fine-tuning
records, identifies the head's starting weights exactly.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harden.errors import HardenError
from harden.files import atomic_path, sha256_bytes, sha256_file
from harden.text.descriptions import Descriptions
from harden.text.encoders import load_encoder, parse_encoder

NPZ_KEYS = ("classes", "embeddings", "encoder", "source_sha256")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
UNIT_TOLERANCE = 1e-3


@dataclass
class ClassEmbeddings:
    """C×E unit rows in label order; `sha256` is the hash of the embeddings.npz bytes.

    Iterating yields (classes, matrix, encoder, sha256), so it unpacks like a tuple.
    """

    classes: list[str]
    matrix: np.ndarray
    encoder: str
    source_sha256: str
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = sha256_bytes(self.to_npz_bytes())

    @property
    def embeddings(self) -> np.ndarray:
        return self.matrix

    def __iter__(self) -> Iterator[Any]:
        return iter((self.classes, self.matrix, self.encoder, self.sha256))

    def to_npz_bytes(self) -> bytes:
        """The .npz file's exact bytes: stored (uncompressed) .npy members with a fixed timestamp."""
        arrays = {
            "classes": np.array(self.classes, dtype=np.str_),
            "embeddings": np.ascontiguousarray(self.matrix, dtype=np.float32),
            "encoder": np.array(self.encoder, dtype=np.str_),
            "source_sha256": np.array(self.source_sha256, dtype=np.str_),
        }
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), "w") as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike[str]) -> None:
        data = self.to_npz_bytes()
        with atomic_path(path, suffix=".npz") as tmp:
            tmp.write_bytes(data)


def class_means(vectors: np.ndarray, counts: list[int]) -> np.ndarray:
    """Normalise each row, average consecutive groups of `counts` rows, renormalise each mean.

    Normalising first gives every description one equal vote whatever its norm;
    renormalising makes the rows cosine-classifier weights.
    """
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms < 1e-12) or not np.all(np.isfinite(vectors)):
        raise HardenError("the encoder returned a zero or non-finite vector for some description")
    unit = vectors / norms
    bounds = np.cumsum([0, *counts])
    means = np.stack([unit[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    mean_norms = np.linalg.norm(means, axis=1, keepdims=True)
    if np.any(mean_norms < 1e-6):
        raise HardenError("a class's descriptions cancel out to a zero mean embedding")
    return (means / mean_norms).astype(np.float32)


def embed_descriptions(descriptions: Descriptions, encoder_id: str = "minilm") -> ClassEmbeddings:
    """Encode every description with `encoder_id` and reduce them to one unit row per class."""
    spec = parse_encoder(encoder_id)
    encode = load_encoder(spec)
    texts = [t for c in descriptions.classes for t in descriptions.descriptions[c]]
    vectors = encode(texts)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise HardenError(f"encoder {spec.id} returned shape {vectors.shape} for {len(texts)} texts")
    matrix = class_means(vectors.astype(np.float64), [len(descriptions.descriptions[c]) for c in descriptions.classes])
    return ClassEmbeddings(list(descriptions.classes), matrix, spec.id, descriptions.content_sha256())


def load_embeddings(path: str | os.PathLike[str]) -> ClassEmbeddings:
    """Read and validate embeddings.npz; `sha256` is the file's hash."""
    path = Path(path)
    if not path.is_file():
        raise HardenError(f"{path}: no such embeddings file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise HardenError(f"{path}: not a harden embeddings file (missing {missing})")
            classes = [str(c) for c in data["classes"].reshape(-1)]
            matrix = np.asarray(data["embeddings"])
            encoder = str(data["encoder"])
            source = str(data["source_sha256"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise HardenError(f"{path}: not a readable .npz ({err})") from err
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != len(classes) or not classes:
        raise HardenError(f"{path}: embeddings {matrix.dtype} {matrix.shape} do not fit {len(classes)} classes "
                          "(expected C×E float32)")
    if len(set(classes)) != len(classes):
        raise HardenError(f"{path}: duplicate class names")
    if not np.all(np.isfinite(matrix)) or np.abs(np.linalg.norm(matrix, axis=1) - 1).max() > UNIT_TOLERANCE:
        raise HardenError(f"{path}: embedding rows are not finite unit vectors")
    return ClassEmbeddings(classes, matrix, encoder, source, sha256=sha256_file(path))
