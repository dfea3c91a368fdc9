"""`harden convert MODEL --data SPEC --embeddings E.npz -o OUT`: harden a model without its source."""

from __future__ import annotations

import argparse
import json

from harden.data import SPEC_HELP
from harden.graph.convert import convert_model
from harden.graph.head_training import HeadTrainConfig
from harden.graph.model_input import PREPROCESS_HELP, parse_preprocess


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="train a text-guided head on an ONNX model's features and graft it")
    parser.add_argument("model", help="input ONNX model (never modified)")
    parser.add_argument("--data", required=True, help=f"training images; {SPEC_HELP}")
    parser.add_argument("--embeddings", required=True, help="embeddings.npz from `harden embed`")
    parser.add_argument("-o", "--out", required=True, help="output ONNX model; the head goes to NAME.head.npz")
    parser.add_argument("--head-out", help="where to write head.npz (default: beside the output)")
    parser.add_argument("--eval", help="evaluation images (default: a seeded 20%% held out of --data)")
    parser.add_argument("--limit", type=int, help="use a seeded random subset of this many --data images")
    parser.add_argument("--eval-limit", type=int, help="use a seeded random subset of this many --eval images")
    parser.add_argument("--output", help="the class-score output, when the model has several")
    parser.add_argument("--distill", action="store_true",
                        help="learn from the original model's scores instead of labels")
    parser.add_argument("--preprocess", help=PREPROCESS_HELP)  # parsed in run(), where errors are one line
    defaults = HeadTrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="AdamW steps")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="mini-batch size")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling, init and batches")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = HeadTrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, distill=args.distill)
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    result = convert_model(args.model, args.data, args.embeddings, args.out, eval_spec=args.eval,
                           output=args.output, preprocess=preprocess, config=config, limit=args.limit,
                           eval_limit=args.eval_limit, head_path=args.head_out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"classifier: {result.classifier}")
    print(f"head: {result.in_features}→{result.embed_dim}→{result.num_classes}, trained on {result.train_images} "
          f"images of {result.train_spec} ({'distilled' if args.distill else 'labels'}, {args.steps} steps, "
          f"final loss {result.final_loss:.4f}); parity max |Δ| = {result.parity_max_abs:.3g}")
    line = f"on {result.eval_images} images of {result.eval_spec}: "
    if result.original_accuracy is not None and result.hardened_accuracy is not None:
        line += (f"original accuracy {100 * result.original_accuracy:.2f}%, hardened "
                 f"{100 * result.hardened_accuracy:.2f}%, ")
    print(line + f"top-1 agreement {100 * result.agreement:.2f}%")
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {result.output} and {result.head} in {result.seconds:.1f} s")
    return 0
