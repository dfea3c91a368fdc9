"""Check the exact analysis of a dynamically quantised classifier against brute force, exhaustively, on a real model.

The tests check every fault on tiny heads; this runs the same exhaustive brute
force (tests/fi/exact_brute.brute_dynamic: every element × bit of the stored
weight, the bias, the input features and the layer output, each image run alone
through ONNX Runtime from the classifier's features) on a model you bring, over
its first N images of a dataset, and compares the SDC and non-finite counts of
every bit with `harden.fi.exact_onnx.analyse_model`'s. It prints both times and
exits 1 on any difference. `--append` adds a Softmax or LogSoftmax after the
model's scores first (as the model zoo's graphs end), to check that path too.

    .venv/bin/python tools/check_exact_dynamic.py MODEL.onnx [--data fashion-mnist:test] [--images 20]
        [--preprocess identity] [--append Softmax|LogSoftmax]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--preprocess", default=None)
    parser.add_argument("--append", choices=("Softmax", "LogSoftmax"), help="a row-wise op after the scores")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from harden.fi.exact_onnx import analyse_model
    from harden.graph.model_input import load_inputs, parse_preprocess
    from harden.graph.onnx_io import load_model
    from tests.fi.exact_brute import brute_dynamic

    model = load_model(args.model)
    if args.append:
        scores = model.graph.output[0]
        node = onnx.helper.make_node(args.append, [scores.name], [f"{scores.name}/{args.append}"], axis=1)
        model.graph.node.append(node)
        scores.name = node.output[0]
    prep = parse_preprocess(args.preprocess) if args.preprocess else None
    x, _ = load_inputs(model, args.data, args.images, preprocess=prep)
    started = time.perf_counter()
    result = analyse_model(model, x)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    brute = brute_dynamic(model, x)
    brute_s = time.perf_counter() - started
    same = True
    for site in result.sites:
        sdc, due = brute[site.role]
        agree = site.sdc == sdc.tolist() and site.due == due.tolist()
        same &= agree
        print(f"{site.role:7s} {site.tensor}: {site.total_faults:,} faults, SDC {site.total_sdc:,} exact / "
              f"{int(sdc.sum()):,} brute force, non-finite {site.total_due:,} / {int(due.sum()):,}: "
              + ("every bit agrees" if agree else "DIFFERS"))
    print(f"{result.head}, {len(x)} images: exact {exact_s:.2f} s, brute force {brute_s:.1f} s; "
          + ("all counts agree" if same else "COUNTS DIFFER"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
