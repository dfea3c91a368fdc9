"""Fine-tuning checkpoints: everything needed to resume, export or audit a run.

A checkpoint is a `torch.save`d dict of plain types and tensors, read back with
`weights_only=True` so that loading one never executes code. It records the
config, data specs, Preprocess, class names, embeddings hash, model shape,
weights, optimiser state and per-epoch metrics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harden.data.preprocess import Preprocess
from harden.errors import HardenError
from harden.files import atomic_path
from harden.train.config import EpochMetrics, FinetuneConfig

FORMAT = "harden-finetune-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "config", "model", "data_spec", "eval_spec", "preprocess", "classes",
            "embeddings_sha256", "epoch", "metrics", "state_dict", "optimizer", "provenance")


@dataclass
class ModelSpec:
    """What `build_model` needs to recreate the network before its weights are loaded."""

    arch: str
    num_classes: int
    head: str
    in_channels: int
    small_input: bool
    image_size: int
    embedding_dim: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Checkpoint:
    """A loaded checkpoint, validated."""

    path: str
    config: FinetuneConfig
    model: ModelSpec
    data_spec: str
    eval_spec: str | None
    preprocess: Preprocess
    classes: list[str]
    embeddings_sha256: str
    epoch: int
    metrics: list[EpochMetrics]
    state_dict: dict[str, Any]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    provenance: dict[str, Any]
    wall_seconds: float

    def build(self) -> Any:
        """The network with the checkpoint's weights, in eval mode, on CPU."""
        from harden.train.backbones import build_model

        spec = self.model
        emb = None
        if spec.head != "baseline":
            emb = np.zeros((spec.num_classes, spec.embedding_dim or 1), dtype=np.float32)
        net = build_model(spec.arch, spec.num_classes, spec.head, emb, spec.in_channels, spec.small_input,
                          pretrained=False, image_size=spec.image_size)
        try:
            net.load_state_dict(self.state_dict)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise HardenError(f"{self.path}: weights do not fit {spec.arch} with a {spec.head} head ({first})") from err
        return net.eval()


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash mid-save keeps the previous epoch's file)."""
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint; anything unreadable or incomplete is a HardenError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise HardenError(f"{path}: no such checkpoint")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and torch errors all mean "not a checkpoint"
        # torch's own text for a non-checkpoint file is advice about weights_only, which would mislead
        # here; name the failure instead.
        raise HardenError(f"{path}: not a readable harden checkpoint (expected a .pt file written by "
                          f"`harden finetune`; torch.load failed with {type(err).__name__})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise HardenError(f"{path}: not a harden finetune checkpoint")
    if raw.get("format_version") != FORMAT_VERSION:
        raise HardenError(f"{path}: checkpoint format {raw.get('format_version')} is not supported "
                          f"(this harden reads {FORMAT_VERSION})")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise HardenError(f"{path}: checkpoint is incomplete (missing {missing})")
    try:
        return Checkpoint(
            path=str(path),
            config=FinetuneConfig.from_dict(raw["config"]),
            model=ModelSpec(**raw["model"]),
            data_spec=str(raw["data_spec"]),
            eval_spec=raw["eval_spec"],
            preprocess=Preprocess.from_dict(raw["preprocess"]),
            classes=[str(c) for c in raw["classes"]],
            embeddings_sha256=str(raw["embeddings_sha256"]),
            epoch=int(raw["epoch"]),
            metrics=[EpochMetrics.from_dict(m) for m in raw["metrics"]],
            state_dict=dict(raw["state_dict"]),
            optimizer=dict(raw["optimizer"]),
            scaler=raw.get("scaler"),
            provenance=dict(raw["provenance"]),
            wall_seconds=float(raw.get("wall_seconds", 0.0)),
        )
    except (TypeError, ValueError, KeyError) as err:
        raise HardenError(f"{path}: checkpoint record is malformed ({err})") from err
