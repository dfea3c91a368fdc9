"""The fine-tuning configuration and its results, as JSON-round-tripping dataclasses.

The config is stored inside every checkpoint, so a run can be resumed, audited
or repeated from the checkpoint alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from harden.errors import HardenError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class FinetuneConfig:
    """Everything that determines a fine-tuning run (paths, model, optimisation, seeds)."""

    arch: str
    data: str
    output: str
    head: str = "text"
    embeddings: str | None = None
    eval_data: str | None = None
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    label_smoothing: float = 0.0
    freeze_head: bool = False
    pretrained: bool = False
    small_input: bool | None = None
    size: int | None = None
    augment: bool = False
    limit: int | None = None
    eval_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int | None = None
    resume: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise HardenError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise HardenError(f"--batch-size must be at least 2 (batch norm), got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise HardenError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise HardenError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise HardenError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise HardenError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr is not None and self.lr <= 0:
            raise HardenError(f"--lr must be positive, got {self.lr}")
        if self.size is not None and self.size < 8:
            raise HardenError(f"--size must be at least 8 pixels, got {self.size}")
        if self.step_size < 1:
            raise HardenError(f"--step-size must be at least 1, got {self.step_size}")

    @property
    def base_lr(self) -> float:
        """The learning rate, defaulting per optimiser (SGD 0.05, AdamW 1e-3)."""
        if self.lr is not None:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 1e-3

    @property
    def decay(self) -> float:
        """Weight decay, defaulting per optimiser (SGD 5e-4, AdamW 0.05)."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def resolved_eval_data(self) -> str | None:
        """`--eval-data`, or the :test split of a built-in training source given as NAME:train."""
        from harden.data.specs import held_out_split

        return self.eval_data or held_out_split(self.data)

    def training_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (the rest may change)."""
        return {k: getattr(self, k) for k in ("arch", "data", "head", "embeddings", "limit", "size",
                                                "pretrained", "small_input", "seed")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HardenError(f"finetune config has unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as err:
            raise HardenError(f"finetune config is malformed: {err}") from err


@dataclass
class EpochMetrics:
    """One epoch's training and held-out numbers."""

    epoch: int
    train_loss: float
    train_acc: float
    eval_loss: float | None
    eval_acc: float | None
    lr: float
    seconds: float
    logit_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochMetrics:
        return cls(**data)


@dataclass
class FinetuneResult:
    """Where the checkpoint went and how training went, epoch by epoch."""

    checkpoint: str
    config: FinetuneConfig
    classes: list[str]
    preprocess: dict[str, Any]
    metrics: list[EpochMetrics] = field(default_factory=list)
    wall_seconds: float = 0.0
    num_parameters: int = 0
    reused: bool = False
    rank: int = 0

    def __post_init__(self) -> None:
        # JSON form (lists, not tuples), so a result equals itself after a JSON round trip
        self.preprocess = json.loads(json.dumps(self.preprocess))

    @property
    def final_eval_acc(self) -> float | None:
        return self.metrics[-1].eval_acc if self.metrics else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        out["metrics"] = [m.to_dict() for m in self.metrics]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneResult:
        data = dict(data)
        data["config"] = FinetuneConfig.from_dict(data["config"])
        data["metrics"] = [EpochMetrics.from_dict(m) for m in data["metrics"]]
        return cls(**data)
