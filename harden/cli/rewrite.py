"""`harden rewrite MODEL -o OUT [--head head.npz] [--range-clip --data SPEC]`: harden an ONNX file."""

from __future__ import annotations

import argparse
import json

from harden.data import SPEC_HELP
from harden.graph.model_input import PREPROCESS_HELP, parse_preprocess
from harden.graph.rewrite import rewrite_file


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("rewrite", help="graft a text-guided head and/or range-clip activations in an ONNX model")
    parser.add_argument("model", help="input ONNX model (never modified)")
    parser.add_argument("-o", "--out", required=True, help="output ONNX model")
    parser.add_argument("--head", help="head.npz from `harden finetune` or `harden convert`: replace the classifier")
    parser.add_argument("--output", help="the class-score output, when the model has several")
    parser.add_argument("--range-clip", action="store_true",
                        help="clip chosen activations to their profiled ±max (Ranger: the activation bounds of the "
                             "injector's --clamp range; stored weights are not clipped)")
    parser.add_argument("--data", help=f"calibration data for --range-clip; {SPEC_HELP}")
    parser.add_argument("--limit", type=int, default=512, help="calibration images (seeded random subset)")
    parser.add_argument("--layers", nargs="+", help="node or tensor names to clip (default: every Conv, "
                        "ConvTranspose, Gemm and MatMul output)")
    parser.add_argument("--preprocess", help=PREPROCESS_HELP)  # parsed in run(), where errors are one line
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and parity inputs")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preprocess = parse_preprocess(args.preprocess) if args.preprocess else None
    result = rewrite_file(args.model, args.out, head_path=args.head, output=args.output,
                          range_clip=args.range_clip, data_spec=args.data, limit=args.limit,
                          layers=args.layers, preprocess=preprocess, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for report in result.passes:
        config = report.config
        if report.name == "text-head":
            print(f"text-head: {config['classifier']}")
            print(f"  head {config['in_features']}→{config['embed_dim']}→{config['num_classes']}, "
                  f"parity with the reference head: max |Δ| = {config['parity_max_abs']:.3g}")
        else:
            print(f"range-clip: {len(config['ranges'])} tensors clipped to profiled ±max over "
                  f"{config['calibration_images']} images of {config['calibration']}, "
                  f"parity on calibration data: max |Δ| = {config['parity_max_abs']:.3g}")
        for note in config.get("notes", []):
            print(f"  note: {note}")
        if config.get("upgraded_from_opset"):
            print(f"  note: upgraded the model from opset {config['upgraded_from_opset']}")
    print(f"wrote {result.output}"
          f"{' (+ external data)' if result.external_data else ''} in {result.seconds:.1f} s")
    return 0
