"""The in-memory dataset every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harden.errors import HardenError


@dataclass
class Dataset:
    """Float32 NCHW images in [0, 1], int64 labels and class names.

    Images stay in their native resolution and channels; a model's `Preprocess`
    adapts them, so one dataset can feed models with different input layouts.
    """

    spec: str
    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    # False when the source names no classes (an .npz without 'classes'): `classes` are then placeholders,
    # class_0 … class_{max label}, that no embeddings file can be matched to by name
    named: bool = True

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise HardenError(f"{self.spec}: images must be N×C×H×W, got shape {self.images.shape}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise HardenError(
                f"{self.spec}: {len(self.images)} images but labels of shape {self.labels.shape}"
            )
        if len(self.images) == 0:
            raise HardenError(f"{self.spec}: the dataset is empty")
        if self.labels.min() < 0 or self.labels.max() >= len(self.classes):
            raise HardenError(
                f"{self.spec}: labels span {self.labels.min()}..{self.labels.max()} "
                f"but there are {len(self.classes)} classes"
            )
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = self.labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def class_counts(self) -> dict[str, int]:
        """Images per class, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, counts)}

    def subset(self, indices: np.ndarray, spec_suffix: str = "") -> Dataset:
        """A view of some images, keeping class names so label ids stay meaningful."""
        return Dataset(
            spec=self.spec + spec_suffix,
            images=self.images[indices],
            labels=self.labels[indices],
            classes=list(self.classes),
            notes=list(self.notes),
            named=self.named,
        )

    def sample(self, limit: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset of at most `limit` images, kept in original order.

        Taking the first N would give a single class for sorted sources such as
        image folders, so the subset is drawn at random from a fixed seed.
        """
        if limit is None or limit >= len(self):
            return self
        if limit <= 0:
            raise HardenError(f"--limit must be positive, got {limit}")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(len(self), size=limit, replace=False))
        return self.subset(idx, spec_suffix=f"@{limit}")

    def summary(self) -> dict[str, object]:
        """Count, shape, value range and per-class counts, as shown by `harden data show`."""
        return {
            "spec": self.spec,
            "count": len(self),
            "shape": list(self.image_shape),
            "range": [float(self.images.min()), float(self.images.max())],
            "classes": len(self.classes),
            "per_class": self.class_counts(),
            "notes": self.notes,
        }
