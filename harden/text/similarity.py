"""How separable the class embeddings are: off-diagonal cosine statistics and a heatmap.

A text-guided head can only tell classes apart as well as their embeddings do.
If two classes' rows have cosine near 1, the head starts out unable to separate
them, so `embed` shows the numbers and a picture before anyone fine-tunes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harden.files import atomic_path

MAX_LABELLED_CLASSES = 40


@dataclass(frozen=True)
class SimilaritySummary:
    """Off-diagonal cosine statistics; the most similar pair is the one most at risk of confusion."""

    classes: int
    min_off_diagonal: float | None
    mean_off_diagonal: float | None
    max_off_diagonal: float | None
    most_similar_pair: tuple[str, str] | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def similarity_summary(matrix: np.ndarray, classes: list[str]) -> SimilaritySummary:
    """Statistics of cos(i, j), i ≠ j, for unit rows; None when there is a single class."""
    sims = np.asarray(matrix, dtype=np.float64) @ np.asarray(matrix, dtype=np.float64).T
    n = sims.shape[0]
    if n < 2:
        return SimilaritySummary(n, None, None, None, None)
    off = ~np.eye(n, dtype=bool)
    values = sims[off]
    i, j = np.unravel_index(np.argmax(np.where(off, sims, -np.inf)), sims.shape)
    return SimilaritySummary(n, float(values.min()), float(values.mean()), float(values.max()),
                             (classes[int(i)], classes[int(j)]))


def plot_similarity(matrix: np.ndarray, classes: list[str], path: str | os.PathLike[str], title: str = "") -> None:
    """Write the C×C cosine matrix as a PNG heatmap (class labels shown when there are few enough)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims = np.asarray(matrix, dtype=np.float64) @ np.asarray(matrix, dtype=np.float64).T
    n = len(classes)
    side = min(4 + 0.35 * n, 14)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        image = ax.imshow(sims, cmap="viridis", vmin=min(float(sims.min()), 0.0), vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
        if n <= MAX_LABELLED_CLASSES:
            ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
            ax.set_yticks(range(n), classes, fontsize=8)
        else:
            ax.set_xlabel("class index")
            ax.set_ylabel("class index")
        ax.set_title(title or f"class embedding similarity ({n} classes)", fontsize=10)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
