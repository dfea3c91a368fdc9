"""The dataset spec parser shared by every subcommand.

Spec syntax: `NAME[:SPLIT]` for built-in sources, `KIND:PATH` for user files.
Built-in sources without an official split are split 80/20 by a fixed seed so
that `:train` and `:test` never overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from harden.data import fashion_mnist, packaged, user_files
from harden.data.dataset import Dataset
from harden.errors import HardenError

SPEC_HELP = (
    "dataset spec: fashion-mnist[:train|:test], mnist5k[:train|:test], digits[:train|:test], "
    "imagefolder:PATH, npz:PATH (x N×C×H×W float32/uint8, y int, optional classes: names in label order)"
)
SPLITS = ("train", "test")
SPLIT_SEED = 20231210

_BUILTIN: dict[str, Callable[[], Dataset]] = {
    "mnist5k": packaged.load_mnist5k,
    "digits": packaged.load_digits,
}
_FILES: dict[str, Callable[[Path], Dataset]] = {
    "npz": user_files.load_npz,
    "imagefolder": user_files.load_imagefolder,
}


def load_dataset(spec: str, limit: int | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by spec, optionally a seeded random subset of `limit` images."""
    name, _, rest = spec.partition(":")
    if name in _FILES:
        if not rest:
            raise HardenError(f"{name}: needs a path, e.g. {name}:/data/images")
        return _FILES[name](Path(rest).expanduser()).sample(limit, seed)
    split = rest or "all"
    if split not in (*SPLITS, "all"):
        raise HardenError(f"unknown split {split!r} in {spec!r}; use :train or :test")
    if name == "fashion-mnist":
        return fashion_mnist.load(split).sample(limit, seed)
    if name in _BUILTIN:
        return split_fixed(_BUILTIN[name](), split).sample(limit, seed)
    raise HardenError(f"unknown dataset {spec!r}; {SPEC_HELP}")


def held_out_split(spec: str) -> str | None:
    """The held-out split matching a built-in `NAME:train` spec, else None.

    Only built-in sources have splits; `imagefolder:/data/train` is a path that
    happens to end in "train", and its "test" sibling is the user's to name.
    """
    name, _, rest = spec.partition(":")
    if rest == "train" and (name == "fashion-mnist" or name in _BUILTIN):
        return f"{name}:test"
    return None


def split_fixed(data: Dataset, split: str) -> Dataset:
    """A reproducible 80/20 train/test split for sources that ship none."""
    if split == "all":
        return data
    order = np.random.default_rng(SPLIT_SEED).permutation(len(data))
    cut = int(round(0.8 * len(data)))
    idx = np.sort(order[:cut] if split == "train" else order[cut:])
    result = data.subset(idx)
    result.spec = f"{data.spec}:{split}"
    return result
