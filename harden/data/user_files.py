"""Datasets a user brings: an image folder or an .npz of arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from harden.data.dataset import Dataset
from harden.errors import HardenError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def load_npz(path: Path) -> Dataset:
    """Arrays `x` (N×C×H×W, float32 in [0, 1] or uint8) and `y` (int); optional `classes`."""
    if not path.is_file():
        raise HardenError(f"npz:{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise HardenError(f"npz:{path}: needs arrays 'x' and 'y', found {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
            classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise HardenError(f"npz:{path}: not a readable .npz file ({err})") from err
    if x.ndim != 4:
        raise HardenError(f"npz:{path}: 'x' must be N×C×H×W, got shape {x.shape}")
    if x.shape[1] not in (1, 3):
        hint = "; it looks N×H×W×C: store x.transpose(0, 3, 1, 2)" if x.shape[3] in (1, 3) else ""
        raise HardenError(f"npz:{path}: 'x' must have 1 or 3 channels in axis 1, got shape {x.shape}{hint}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype.kind == "f":
        x = x.astype(np.float32)
    else:
        raise HardenError(f"npz:{path}: 'x' must be float32 or uint8, got {x.dtype}")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise HardenError(f"npz:{path}: 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and int(y.min()) < 0:
        raise HardenError(f"npz:{path}: 'y' holds negative labels (down to {int(y.min())}); labels are class "
                          "indices 0, 1, ...")
    named = classes is not None
    if classes is None:
        classes = [f"class_{i}" for i in range(int(y.max()) + 1 if len(y) else 0)]
    return Dataset(f"npz:{path}", x, y.astype(np.int64), classes, named=named)


def load_imagefolder(path: Path) -> Dataset:
    """One sub-folder per class (sorted names); images resized to the first image's size."""
    if not path.is_dir():
        raise HardenError(f"imagefolder:{path}: not a folder")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if not class_dirs:
        raise HardenError(f"imagefolder:{path}: no class sub-folders")
    images: list[np.ndarray] = []
    labels: list[int] = []
    size: tuple[int, int] | None = None
    resized = 0
    for label, folder in enumerate(class_dirs):
        for file in sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                raise HardenError(f"imagefolder: {file} is not a readable image ({err})") from err
            if size is None:
                size = rgb.size
            elif rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BILINEAR)
                resized += 1
            images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    if not images:
        raise HardenError(f"imagefolder:{path}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    notes = [f"{resized} images resized to {size}"] if resized else []
    return Dataset(
        f"imagefolder:{path}", np.stack(images), np.asarray(labels), [d.name for d in class_dirs], notes=notes
    )
