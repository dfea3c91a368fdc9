"""`harden export`: a fine-tuned checkpoint as ONNX (+ head.npz), checked against torch first."""

from __future__ import annotations

import argparse
import json

from harden.data import SPEC_HELP


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("export", help="export a finetune checkpoint to ONNX, verified with ONNX Runtime")
    parser.add_argument("checkpoint", help="checkpoint from `harden finetune`")
    parser.add_argument("-o", "--output", required=True, help="model.onnx to write (head.npz goes beside it)")
    parser.add_argument("--data", help=f"images for the parity check (default: the checkpoint's eval set); {SPEC_HELP}")
    parser.add_argument("--check-images", type=int, default=64, help="how many images the parity check runs")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (at least 17)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from harden.train.export import export_onnx

    result = export_onnx(args.checkpoint, args.output, data=args.data, check_images=args.check_images,
                         opset=args.opset)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"wrote {result.model} (opset {result.opset}, {result.head} head, input {result.input_shape}); "
          f"ORT vs torch on {result.images_checked} images: max |Δ| {result.max_abs_diff:.2g}, "
          f"top-1 agreement {result.top1_agreement:.0%}")
    if result.head_params:
        print(f"wrote {result.head_params}")
    return 0
