"""Head-only training for `harden convert`: a TextGuidedHead fitted on cached features.

With labels the loss is cross-entropy. With `distill` it is the
temperature-scaled KL divergence to the original model's class scores
(Hinton et al. 2015), so an unlabelled set is enough and the hardened model
learns to agree with the original. AdamW over shuffled mini-batches, a fixed
number of steps; the initialisation and the batch order come only from `seed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harden.errors import HardenError
from harden.head import HeadParams


@dataclass(frozen=True)
class HeadTrainConfig:
    """How the head is trained; recorded in the output's provenance."""

    steps: int = 400
    batch: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    distill: bool = False
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise HardenError("head training: steps, batch, lr and temperature must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_head(features: np.ndarray, embeddings: np.ndarray, classes: list[str], config: HeadTrainConfig,
               labels: np.ndarray | None = None, teacher: np.ndarray | None = None,
               embeddings_sha256: str = "") -> tuple[HeadParams, float]:
    """Fit a TextGuidedHead on N×d `features`; returns its parameters and the last mini-batch loss."""
    import torch
    from torch import nn

    from harden.head import TextGuidedHead

    if config.distill and teacher is None:
        raise HardenError("distillation needs the original model's scores")
    if not config.distill and labels is None:
        raise HardenError("head training needs labels, or --distill to learn from the original model")
    x = torch.from_numpy(np.ascontiguousarray(features.reshape(len(features), -1), dtype=np.float32))
    target = (torch.from_numpy(np.asarray(teacher, dtype=np.float32).reshape(len(x), -1)) if config.distill
              else torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # nn.Linear draws its initial weights from the global generator
        head = TextGuidedHead(x.shape[1], embeddings)
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    temperature = config.temperature
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    loss = torch.tensor(float("nan"))
    for _ in range(config.steps):
        if cursor + config.batch > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        idx = order[cursor:cursor + config.batch]
        cursor += config.batch
        logits = head(x[idx])
        if config.distill:
            soft = nn.functional.softmax(target[idx] / temperature, dim=1)
            loss = nn.functional.kl_div(nn.functional.log_softmax(logits / temperature, dim=1), soft,
                                        reduction="batchmean") * temperature ** 2
        else:
            loss = nn.functional.cross_entropy(logits, target[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return head.to_params(classes, embeddings_sha256), float(loss.detach())
