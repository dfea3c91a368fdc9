"""Fashion-MNIST from local files: Debian's package, $HARDEN_DATA, or an opt-in download.

The project runs where only package registries are reachable, so the default
sources are local. Downloading from the official mirror happens only when the
user asks for it with HARDEN_DOWNLOAD=1.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np

from harden.data.dataset import Dataset
from harden.errors import HardenError
from harden.files import atomic_path

CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
HOW_TO_GET = (
    "Fashion-MNIST not found. Either `apt-get install dataset-fashion-mnist` (Debian), "
    "or put the four *-ubyte.gz files in $HARDEN_DATA/fashion-mnist, "
    "or set HARDEN_DOWNLOAD=1 to download them from the official mirror"
)


def candidate_dirs() -> list[Path]:
    """Folders searched in order: $HARDEN_DATA(/fashion-mnist), Debian's, the download cache."""
    dirs: list[Path] = []
    if env := os.environ.get("HARDEN_DATA"):
        dirs += [Path(env) / "fashion-mnist", Path(env)]
    dirs += [DEBIAN_DIR, cache_dir()]
    return dirs


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harden" / "fashion-mnist"


def find_dir() -> Path:
    """The first folder holding all four files, downloading into the cache only on request."""
    names = [n for pair in FILES.values() for n in pair]
    for folder in candidate_dirs():
        if all((folder / n).is_file() for n in names):
            return folder
    if os.environ.get("HARDEN_DOWNLOAD") == "1":
        return _download(cache_dir(), names)
    raise HardenError(HOW_TO_GET)


def _download(folder: Path, names: list[str]) -> Path:
    for name in names:
        dest = folder / name
        if dest.is_file():
            continue
        try:
            with atomic_path(dest) as tmp, urllib.request.urlopen(OFFICIAL_URL + name, timeout=30) as resp:
                tmp.write_bytes(resp.read())
        except OSError as err:
            raise HardenError(f"downloading {name} failed ({err}). {HOW_TO_GET}") from err
    return folder


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST family's format), validating its header."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise HardenError(f"{path}: not a readable gzip IDX file ({err})") from err
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise HardenError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise HardenError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise HardenError(f"{path}: expected {expected} bytes of data for shape {dims}, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load(split: str) -> Dataset:
    """One split ('train', 'test') or both ('all', train first)."""
    folder = find_dir()
    splits = ["train", "test"] if split == "all" else [split]
    images, labels = [], []
    for part in splits:
        img_name, lab_name = FILES[part]
        x = read_idx(folder / img_name)
        y = read_idx(folder / lab_name)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise HardenError(f"{folder}: {part} images {x.shape} and labels {y.shape} do not match")
        images.append(x)
        labels.append(y)
    x = np.concatenate(images)[:, None].astype(np.float32) / 255.0
    spec = "fashion-mnist" if split == "all" else f"fashion-mnist:{split}"
    return Dataset(spec, x, np.concatenate(labels).astype(np.int64), list(CLASSES), notes=[f"from {folder}"])
