"""Tiny fine-tuning runs for the train/export/CLI tests: 8×8 digits, a few dozen images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harden.train.config import FinetuneConfig

DIGITS = [str(d) for d in range(10)]


def write_embeddings(path: Path, classes: list[str] = DIGITS, dim: int = 16, seed: int = 0) -> Path:
    """Random unit rows in the embeddings.npz layout of `harden embed`."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(classes), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(path, classes=np.asarray(classes), embeddings=emb, encoder=np.asarray("test"),
             source_sha256=np.asarray(""))
    return path


def tiny_config(tmp_path: Path, name: str = "ckpt.pt", **overrides: Any) -> FinetuneConfig:
    """tinyresnet on 96 training digits, evaluated on 48, two steps per epoch."""
    emb = tmp_path / "emb.npz"
    if not emb.exists():
        write_embeddings(emb)
    values: dict[str, Any] = dict(arch="tinyresnet", data="digits:train", output=str(tmp_path / name),
                                  head="text", embeddings=str(emb), epochs=1, batch_size=48, limit=96,
                                  eval_limit=48, threads=2, progress=False, lr=0.05)
    values.update(overrides)
    return FinetuneConfig(**values)
