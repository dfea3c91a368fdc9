"""`finetune(config)`: train a backbone with a text-guided, baseline or random head.

The loop is deliberately plain: in-memory tensors, a DistributedSampler for the
order (so one process and torchrun share one code path), a pure-function
learning-rate schedule, per-epoch seeds, and a checkpoint written atomically by
rank 0 after every epoch. Those choices make a resumed run reproduce the
uninterrupted one exactly on the same hardware.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harden import __version__
from harden.errors import HardenError
from harden.provenance import environment
from harden.train.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from harden.train.config import EpochMetrics, FinetuneConfig, FinetuneResult
from harden.train.distributed import DistContext, setup_distributed

RUNTIME_FIELDS = ("output", "resume", "progress", "device", "amp", "threads", "epochs")


def finetune(config: FinetuneConfig, *, reuse: bool = False, log: Callable[[str], None] | None = None,
             on_epoch: Callable[[EpochMetrics], None] | None = None) -> FinetuneResult:
    """Train and checkpoint; returns the per-epoch metrics and the checkpoint path.

    reuse: when `config.output` already holds a checkpoint of this same config,
    return it if it has all the epochs, or continue it if it has fewer.
    log: receives one line per epoch. on_epoch: called after each epoch's checkpoint.
    """
    import torch

    started = time.perf_counter()
    say = log or (lambda _line: None)
    if reuse and config.resume is None and Path(config.output).is_file():
        existing = load_checkpoint(config.output)
        if _same_run(existing.config, config):
            if existing.epoch >= config.epochs:
                say(f"reusing {config.output} ({existing.epoch} epochs)")
                return result_from_checkpoint(existing, reused=True)
            config = FinetuneConfig.from_dict({**config.to_dict(), "resume": config.output})
    if config.threads:
        torch.set_num_threads(config.threads)
    use_cuda = _use_cuda(config.device)
    dist = setup_distributed(use_cuda)
    try:
        return _run(config, dist, use_cuda, started, say, on_epoch)
    finally:
        dist.close()


def _run(config: FinetuneConfig, dist: DistContext, use_cuda: bool, started: float,
         say: Callable[[str], None], on_epoch: Callable[[EpochMetrics], None] | None) -> FinetuneResult:
    import torch

    from harden.train.backbones import build_model
    from harden.train.embeddings import load_aligned_embeddings
    from harden.train.loop import evaluate, train_epoch
    from harden.train.trainset import choose_preprocess, load_training_data, resolve_small_input, to_tensors

    device = torch.device(f"cuda:{dist.local_rank}" if use_cuda else "cpu")
    if not dist.is_main:
        say = _quiet
    resumed = load_checkpoint(config.resume) if config.resume else None
    if resumed is not None and resumed.config.training_key() != config.training_key():
        raise HardenError(f"{config.resume}: checkpoint was trained with {resumed.config.training_key()}, "
                          f"not {config.training_key()}")
    if resumed is not None and resumed.epoch >= config.epochs:
        raise HardenError(f"{config.resume} already has {resumed.epoch} epochs; ask for more with --epochs")
    data = load_training_data(config)
    classes = data.train.classes
    emb, emb_sha = None, ""
    if config.head == "text" and not config.embeddings:
        raise HardenError("--head text needs --embeddings E.npz (from `harden embed`)")
    if config.head != "baseline" and config.embeddings:
        emb, emb_sha = load_aligned_embeddings(config.embeddings, classes, data.train.named)
    if resumed is not None and resumed.embeddings_sha256 != emb_sha:
        raise HardenError(f"{config.embeddings}: differs from the embeddings {config.resume} was trained with")
    preprocess = resumed.preprocess if resumed is not None else choose_preprocess(config, data.train)
    x_train, y_train = to_tensors(data.train, preprocess)
    x_eval, y_eval = to_tensors(data.eval, preprocess) if data.eval is not None else (None, None)
    hw = tuple(x_train.shape[-2:])
    spec = ModelSpec(arch=config.arch, num_classes=len(classes), head=config.head,
                     in_channels=preprocess.channels, small_input=resolve_small_input(config, hw),
                     image_size=int(hw[0]), embedding_dim=None if config.head == "baseline" else
                     (int(emb.shape[1]) if emb is not None else 512))
    core = build_model(spec.arch, spec.num_classes, spec.head, emb, spec.in_channels, spec.small_input,
                       pretrained=config.pretrained and resumed is None, image_size=spec.image_size,
                       seed=config.seed)
    if config.freeze_head:
        for param in core.head.parameters():
            param.requires_grad_(False)
    optimizer = _optimizer(core, config)
    metrics: list[EpochMetrics] = []
    start_epoch, prior_seconds = 0, 0.0
    if resumed is not None:
        core.load_state_dict(resumed.state_dict)
        optimizer.load_state_dict(resumed.optimizer)
        metrics, start_epoch, prior_seconds = list(resumed.metrics), resumed.epoch, resumed.wall_seconds
    core.to(device)
    _optimizer_to(optimizer, device)
    use_amp = bool(config.amp and use_cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if resumed is not None and resumed.scaler and use_amp:
        scaler.load_state_dict(resumed.scaler)
    model = core
    if dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if use_cuda else None)
    if use_cuda:
        x_train, y_train = x_train.to(device), y_train.to(device)
    num_params = sum(p.numel() for p in core.parameters())
    say(f"{config.arch} + {config.head} head: {num_params:,} parameters, {len(y_train)} training images "
        f"{tuple(x_train.shape[1:])}, eval on {data.eval_spec or 'nothing'}, device {device}"
        + (f", {dist.world_size} processes" if dist.enabled else ""))
    run_started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        tick = time.perf_counter()
        train = train_epoch(model, core, optimizer, scaler, x_train, y_train, epoch, config, dist, device, use_amp)
        held = evaluate(core, x_eval, y_eval, dist, device, use_amp) if x_eval is not None else None
        scale = getattr(core.head, "logit_scale", None)
        metrics.append(EpochMetrics(
            epoch=epoch + 1, train_loss=train.loss, train_acc=train.acc,
            eval_loss=held.loss if held else None, eval_acc=held.acc if held else None,
            lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - tick,
            logit_scale=float(scale.detach()) if scale is not None else None))
        if dist.is_main:
            save_checkpoint(config.output, {
                "config": config.to_dict(), "model": spec.to_dict(), "data_spec": data.train.spec,
                "eval_spec": data.eval_spec, "preprocess": preprocess.to_dict(), "classes": classes,
                "embeddings_sha256": emb_sha, "epoch": epoch + 1, "metrics": [m.to_dict() for m in metrics],
                "state_dict": {k: v.detach().cpu() for k, v in core.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if use_amp else None,
                "provenance": {"harden": __version__, **environment()},
                "wall_seconds": prior_seconds + time.perf_counter() - run_started,
                "num_parameters": num_params,
            })
        dist.barrier()
        m = metrics[-1]
        say(f"epoch {m.epoch}/{config.epochs}: train loss {m.train_loss:.4f} acc {m.train_acc:.4f}"
            + (f", eval loss {m.eval_loss:.4f} acc {m.eval_acc:.4f}" if m.eval_acc is not None else "")
            + f", {m.seconds:.1f}s")
        if on_epoch is not None:
            on_epoch(m)
    warning = stall_warning(metrics, len(classes), config)
    if warning:
        say(warning)
    return FinetuneResult(checkpoint=str(config.output), config=config, classes=list(classes),
                          preprocess=preprocess.to_dict(), metrics=metrics,
                          wall_seconds=prior_seconds + time.perf_counter() - run_started,
                          num_parameters=num_params, rank=dist.rank)


def stall_warning(metrics: list[EpochMetrics], num_classes: int, config: FinetuneConfig) -> str | None:
    """A warning when training accuracy ended near chance, which a user should not mistake for a result.

    Seen with a text-guided head on a backbone trained from scratch with SGD:
    the features' normalisation scales the backbone's gradients by 1/‖P f + b‖,
    and with a ResNet-18 on 32 px digits the run stayed at chance at lr 0.05
    and 0.005, while AdamW (scale-invariant steps) reached 99% train accuracy.
    """
    if not metrics or metrics[-1].train_acc > 1.5 / max(num_classes, 1):
        return None
    hint = ""
    if config.head != "baseline" and config.optimizer == "sgd":
        hint = ("; a text-guided head on features that are not yet trained can stall under SGD, "
                "try --optimizer adamw")
    return (f"warning: training accuracy ended at {metrics[-1].train_acc:.1%}, near chance "
            f"({1 / max(num_classes, 1):.1%}) for {num_classes} classes{hint}")


def _quiet(_line: str) -> None:
    """Ranks other than 0 stay silent so a torchrun job prints each line once."""


def resume_config(checkpoint: str, epochs: int | None = None, output: str | None = None,
                  **overrides: Any) -> FinetuneConfig:
    """The stored config of `checkpoint`, set up to continue it (to `epochs`, into `output`)."""
    ckpt = load_checkpoint(checkpoint)
    values = {**ckpt.config.to_dict(), "resume": checkpoint, "output": output or checkpoint, **overrides}
    if epochs is not None:
        values["epochs"] = epochs
    return FinetuneConfig.from_dict(values)


def result_from_checkpoint(ckpt: Checkpoint, reused: bool = False) -> FinetuneResult:
    """A FinetuneResult describing an existing checkpoint."""
    return FinetuneResult(checkpoint=ckpt.path, config=ckpt.config, classes=ckpt.classes,
                          preprocess=ckpt.preprocess.to_dict(), metrics=ckpt.metrics,
                          wall_seconds=ckpt.wall_seconds,
                          num_parameters=sum(int(v.numel()) for k, v in ckpt.state_dict.items()
                                             if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))),
                          reused=reused)


def _same_run(stored: FinetuneConfig, wanted: FinetuneConfig) -> bool:
    a = {k: v for k, v in stored.to_dict().items() if k not in RUNTIME_FIELDS}
    b = {k: v for k, v in wanted.to_dict().items() if k not in RUNTIME_FIELDS}
    return a == b


def _use_cuda(device: str) -> bool:
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise HardenError("--device cuda: no CUDA device is available")
    return device == "cuda" or (device == "auto" and available)


def _optimizer(core: Any, config: FinetuneConfig) -> Any:
    """SGD (momentum) or AdamW; no weight decay on 1-D parameters (norms, biases, the logit scale)."""
    import torch

    trainable = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
    if not trainable:
        raise HardenError("nothing to train: every parameter is frozen")
    decay = [p for _, p in trainable if p.ndim > 1]
    no_decay = [p for _, p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.base_lr)


def _optimizer_to(optimizer: Any, device: Any) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if hasattr(value, "to") and key != "step":
                state[key] = value.to(device)
