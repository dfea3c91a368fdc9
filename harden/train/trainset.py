"""The tensors a fine-tuning run trains and evaluates on, and the preprocessing it declares.

Images are preprocessed once, up front, with the same `Preprocess` that is then
stored in the checkpoint and in the exported model's metadata, so training,
export and fault injection all feed the network identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from harden.data import Dataset, Preprocess, load_dataset
from harden.errors import HardenError
from harden.train.config import FinetuneConfig

SMALL_INPUT_MAX = 32


@dataclass
class TrainingData:
    train: Dataset
    eval: Dataset | None
    eval_spec: str | None


def load_training_data(config: FinetuneConfig) -> TrainingData:
    """The training set and the held-out set (same class list required)."""
    train = load_dataset(config.data, limit=config.limit, seed=config.seed)
    eval_spec = config.resolved_eval_data()
    held_out = None
    if eval_spec is not None:
        held_out = load_dataset(eval_spec, limit=config.eval_limit, seed=config.seed)
        if held_out.classes != train.classes:
            raise HardenError(f"{eval_spec} has classes {held_out.classes[:4]}… but {config.data} has "
                              f"{train.classes[:4]}…; evaluate on the same label set")
    return TrainingData(train=train, eval=held_out, eval_spec=eval_spec)


def choose_preprocess(config: FinetuneConfig, train: Dataset) -> Preprocess:
    """Pretrained Lite0: its 3-channel TF normalisation. Otherwise: native channels and size, train-set mean/std."""
    if config.arch == "efficientnet_lite0" and config.pretrained:
        from harden.train.efficientnet_lite import lite_preprocess

        return lite_preprocess(config.size or 224)
    channels = 3 if config.arch == "efficientnet_lite0" else train.image_shape[0]
    per_channel = train.images.transpose(1, 0, 2, 3).reshape(train.image_shape[0], -1)
    mean = tuple(round(float(v), 4) for v in per_channel.mean(axis=1))
    std = tuple(round(max(float(v), 1e-3), 4) for v in per_channel.std(axis=1))
    if channels != train.image_shape[0]:
        mean, std = mean[:1], std[:1]
    # record the concrete input size, so other datasets are resized to what the model was trained on
    _, h, w = train.image_shape
    size = config.size if config.size is not None else (h if h == w else None)
    return Preprocess(channels=channels, size=size, mean=mean, std=std)


def resolve_small_input(config: FinetuneConfig, input_hw: tuple[int, int]) -> bool:
    """Explicit --small-input, else on for torchvision models seeing at most 32 px."""
    if config.small_input is not None:
        return config.small_input
    return config.arch not in ("tinyresnet", "efficientnet_lite0") and max(input_hw) <= SMALL_INPUT_MAX


def to_tensors(data: Dataset, preprocess: Preprocess) -> tuple[Any, Any]:
    """(images, labels) as torch tensors after the model's preprocessing."""
    import torch

    x = preprocess.apply(data.images)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(data.labels.astype(np.int64))


def augment(x: Any, generator: Any, max_shift: int = 2) -> Any:
    """Random horizontal flips and integer shifts (zero fill), drawn from `generator`.

    Flips are label-preserving for clothing and natural images but not for digits
    or text, which is why augmentation is opt-in.
    """
    import torch

    n, _, h, w = x.shape
    # draws come from the CPU generator (reproducible everywhere), then move to x's device
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    rows = torch.arange(h, device=x.device)[None, :] + max_shift - shifts[:, :1]  # n×h
    cols = torch.arange(w, device=x.device)[None, :] + max_shift - shifts[:, 1:]  # n×w
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n×h×w×c
    return out.permute(0, 3, 1, 2).contiguous()
