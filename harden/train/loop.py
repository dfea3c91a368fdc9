"""One training epoch, one held-out evaluation, and the learning-rate schedule.

The schedule is a pure function of (epoch, step), not a stateful scheduler, so a
resumed run sets exactly the learning rates the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harden.head import LOGIT_SCALE_MAX
from harden.train.config import FinetuneConfig
from harden.train.distributed import DistContext

EVAL_BATCH = 512


def lr_at(config: FinetuneConfig, epoch: int, step: int, steps: int) -> float:
    """Cosine (per step, to zero at the end), step decay (×gamma every step_size epochs) or constant."""
    base = config.base_lr
    if config.schedule == "cosine":
        t = (epoch + step / max(steps, 1)) / config.epochs
        return base * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    if config.schedule == "step":
        return base * config.gamma ** (epoch // config.step_size)
    return base


@dataclass
class EpochTotals:
    loss: float
    acc: float


def epoch_batches(n: int, epoch: int, config: FinetuneConfig, dist: DistContext) -> list[Any]:
    """This rank's shuffled index batches, from DistributedSampler seeded by (seed, epoch)."""
    import torch
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.long)
    batches = list(order.split(config.batch_size))
    if batches and len(batches[-1]) < 2:  # batch norm cannot train on one sample
        batches.pop()
    return batches


def train_epoch(model: Any, core: Any, optimizer: Any, scaler: Any, x: Any, y: Any, epoch: int,
                config: FinetuneConfig, dist: DistContext, device: Any, use_amp: bool) -> EpochTotals:
    """One pass over this rank's shard; returns the loss and accuracy summed over all ranks."""
    import torch
    from tqdm import tqdm

    from harden.train.trainset import augment

    torch.manual_seed(config.seed * 100_003 + epoch)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch + 1)
    batches = epoch_batches(len(y), epoch, config, dist)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    sums = [0.0, 0.0, 0.0]  # loss·n, correct, n
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, unit="batch",
               disable=not (config.progress and dist.is_main))
    for step, idx in enumerate(bar):
        lr = lr_at(config, epoch, step, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        xb, yb = x[idx], y[idx]
        if config.augment:
            xb = augment(xb, generator)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(xb)
            loss = loss_fn(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        clamp_logit_scale(core)
        n = len(yb)
        sums[0] += float(loss.detach()) * n
        sums[1] += float((logits.detach().argmax(1) == yb).sum())
        sums[2] += n
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}", lr=f"{lr:.3g}")
    total = dist.all_sum(sums, device=device if device.type == "cuda" else None)
    return EpochTotals(loss=total[0] / max(total[2], 1), acc=total[1] / max(total[2], 1))


def clamp_logit_scale(core: Any) -> None:
    """Keep s ≤ log(100) in the parameter itself, as CLIP does after each step."""
    import torch

    scale = getattr(core.head, "logit_scale", None)
    if scale is not None:
        with torch.no_grad():
            scale.clamp_(max=LOGIT_SCALE_MAX)


def evaluate(model: Any, x: Any, y: Any, dist: DistContext, device: Any, use_amp: bool) -> EpochTotals:
    """Held-out loss and top-1 accuracy; ranks take interleaved slices and sum their counts."""
    import torch

    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    idx = torch.arange(dist.rank, len(y), dist.world_size)
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad():
        for part in idx.split(EVAL_BATCH):
            xb, yb = x[part].to(device), y[part].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(xb).float()
            sums[0] += float(loss_fn(logits, yb))
            sums[1] += float((logits.argmax(1) == yb).sum())
            sums[2] += len(yb)
    total = dist.all_sum(sums, device=device if device.type == "cuda" else None)
    return EpochTotals(loss=total[0] / max(total[2], 1), acc=total[1] / max(total[2], 1))
