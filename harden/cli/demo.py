"""`harden demo`: the whole pipeline on offline data, ending with the paper-style table."""

from __future__ import annotations

import argparse



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end comparison on offline data (reuses finished stages)",
                       description="Built-in descriptions → MiniLM embeddings → fine-tune baseline, text-head and "
                                   "random-head models → export → certify each against the baseline, with and "
                                   "without range clamping → results table.")
    p.add_argument("--workdir", default="runs/demo", help="where every stage's files go (default: runs/demo)")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "mnist5k"],
                   help="auto: Fashion-MNIST when installed, else MNIST-5k")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=30_000, help="training images (0: all 60,000)")
    p.add_argument("--injections", type=int, default=1000, help="injections per layer and model")
    p.add_argument("--certify-limit", type=int, default=500, help="test images drawn for certification")
    p.add_argument("--heads", nargs="+", default=["text", "random"], choices=["text", "random", "templates"],
                   help="heads compared with the baseline; 'templates' is the text head from CLIP templates "
                        "instead of descriptions (the prompt ablation)")
    p.add_argument("--full", action="store_true",
                   help="also fine-tune EfficientNet-Lite0 from its ImageNet weights (baseline and text head)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from harden.demo import DemoConfig, run_demo
    from harden.demo.table import markdown_table
    from harden.files import atomic_open

    config = DemoConfig(workdir=args.workdir, dataset=args.dataset, epochs=args.epochs,
                        train_limit=args.train_limit or None, injections=args.injections,
                        certify_limit=args.certify_limit, heads=tuple(args.heads), full=args.full, seed=args.seed,
                        threads=args.threads,
                        progress=not args.no_progress)
    result = run_demo(config)
    table = markdown_table(result.rows)
    with atomic_open(f"{result.workdir}/results.md") as handle:
        handle.write(table + "\n")
    print()
    print(f"Results on {result.dataset} ({result.workdir}/results.md; reports in {result.workdir}/reports/):")
    print(table)
    print()
    print("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()))
    return 0
