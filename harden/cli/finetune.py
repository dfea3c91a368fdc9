"""`harden finetune`: train a backbone with a text-guided, baseline or random head."""

from __future__ import annotations

import argparse
import json
import sys

from harden.data import SPEC_HELP
from harden.errors import HardenError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "finetune", help="fine-tune a backbone with a text-guided (or baseline) head",
        description="Fine-tune a backbone. Under torchrun it trains with DistributedDataParallel; "
                    "only rank 0 writes the checkpoint.")
    parser.add_argument("--arch", help="tinyresnet, efficientnet_lite0, or a torchvision model (resnet18, ...)")
    parser.add_argument("--data", help=SPEC_HELP)
    parser.add_argument("--eval-data", help="held-out spec (default: NAME:test when --data is a built-in NAME:train)")
    parser.add_argument("--embeddings", help="embeddings.npz from `harden embed` (needed for --head text)")
    parser.add_argument("--head", choices=("text", "baseline", "random"), default="text")
    parser.add_argument("--epochs", type=int, help="total epochs (default 5; with --resume: the checkpoint's)")
    parser.add_argument("-o", "--output", help="checkpoint to write (with --resume: defaults to the same file)")
    parser.add_argument("--resume", help="continue training from this checkpoint, with its config")
    parser.add_argument("--reuse", action="store_true",
                        help="if --output already holds this run, return it (or continue it if unfinished)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    opt.add_argument("--lr", type=float, help="learning rate (default: sgd 0.05, adamw 1e-3)")
    opt.add_argument("--momentum", type=float, default=0.9)
    opt.add_argument("--weight-decay", type=float, help="default: sgd 5e-4, adamw 0.05")
    opt.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    opt.add_argument("--step-size", type=int, default=30, help="epochs between decays for --schedule step")
    opt.add_argument("--gamma", type=float, default=0.1, help="decay factor for --schedule step")
    opt.add_argument("--label-smoothing", type=float, default=0.0)
    opt.add_argument("--batch-size", type=int, default=128)
    opt.add_argument("--freeze-head", action="store_true", help="train the backbone only; the head stays as initialised")
    opt.add_argument("--augment", action="store_true", help="random flips and 2-px shifts (not for digits)")
    model = parser.add_argument_group("model and data")
    model.add_argument("--pretrained", action="store_true", help="start from local ImageNet weights (efficientnet_lite0)")
    model.add_argument("--small-input", action=argparse.BooleanOptionalAction, default=None,
                       help="3×3 stride-1 stem without max-pool (default: on for torchvision models at ≤32 px)")
    model.add_argument("--size", type=int, help="resize images to SIZE×SIZE")
    model.add_argument("--limit", type=int, help="train on a seeded random subset of this many images")
    model.add_argument("--eval-limit", type=int, help="evaluate on a seeded random subset of this many images")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from harden.train.config import FinetuneConfig
    from harden.train.finetune import finetune, resume_config, stall_warning

    runtime = {"device": args.device, "amp": not args.no_amp, "threads": args.threads,
               "progress": not args.no_progress}
    if args.resume:
        config = resume_config(args.resume, epochs=args.epochs, output=args.output, **runtime)
    else:
        missing = [flag for flag, value in (("--arch", args.arch), ("--data", args.data), ("-o", args.output))
                   if not value]
        if missing:
            raise HardenError(f"missing {', '.join(missing)} (or give --resume CHECKPOINT)")
        config = FinetuneConfig(
            arch=args.arch, data=args.data, output=args.output, head=args.head, embeddings=args.embeddings,
            eval_data=args.eval_data, epochs=5 if args.epochs is None else args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            schedule=args.schedule, step_size=args.step_size, gamma=args.gamma,
            label_smoothing=args.label_smoothing, freeze_head=args.freeze_head, pretrained=args.pretrained,
            small_input=args.small_input, size=args.size, augment=args.augment, limit=args.limit,
            eval_limit=args.eval_limit, seed=args.seed, **runtime)
    result = finetune(config, reuse=args.reuse, log=None if args.json else print)
    if result.rank != 0:
        return 0
    if args.json:
        warning = stall_warning(result.metrics, len(result.classes), result.config)
        if warning:
            print(warning, file=sys.stderr)
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    acc = result.final_eval_acc
    print(f"wrote {result.checkpoint}: {len(result.metrics)} epochs, "
          + (f"held-out accuracy {acc:.4f}, " if acc is not None else "")
          + f"{result.wall_seconds:.1f}s")
    return 0
