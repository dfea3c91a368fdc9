"""The preprocessing a model expects, declared once and recorded in every output.

A model trained on 1-channel 28 px images normalised with some mean and std must
see exactly that at fine-tune, export, convert and fault-injection time. Storing
this dataclass in checkpoints and ONNX `metadata_props` and applying it here is
what keeps those stages consistent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from harden.errors import HardenError


@dataclass(frozen=True)
class Preprocess:
    """Channels, square size and per-channel mean/std applied to [0, 1] images.

    `channels=0` stands for "as many as the model takes": `--preprocess identity`
    is parsed before the model is read, and `model_preprocess` resolves it.
    """

    channels: int = 1
    size: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.channels not in (0, 1, 3):
            raise HardenError(f"preprocess: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            raise HardenError("preprocess: mean/std need 1 value or one per channel")
        if any(s <= 0 for s in self.std):
            raise HardenError("preprocess: std values must be positive")

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Map float32 NCHW images in [0, 1] to the model's input tensor."""
        x = np.asarray(images, dtype=np.float32)
        x = _convert_channels(x, self.channels or x.shape[1])
        if self.size is not None and x.shape[-2:] != (self.size, self.size):
            x = _resize(x, self.size)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def input_shape(self, native_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) that `apply` produces from images of `native_hw`."""
        hw = (self.size, self.size) if self.size is not None else native_hw
        return (self.channels, *hw)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Preprocess:
        try:
            return cls(
                channels=int(data["channels"]),  # type: ignore[arg-type]
                size=None if data.get("size") is None else int(data["size"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[union-attr]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[union-attr]
            )
        except (KeyError, TypeError, ValueError) as err:
            raise HardenError(f"preprocess record is malformed: {data!r}") from err

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise HardenError(f"preprocess record is not JSON: {text[:80]!r}") from err


IMAGENET = Preprocess(channels=3, size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Grey to RGB by repetition, RGB to grey by ITU-R 601 luminance."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have == 3 and channels == 1:
        weights = np.asarray([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return (x * weights).sum(axis=1, keepdims=True)
    raise HardenError(f"cannot convert images with {have} channels to {channels}")


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of each plane through Pillow's float ('F') images."""
    n, c = x.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            plane = Image.fromarray(x[i, j], mode="F")
            out[i, j] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))
    return out
