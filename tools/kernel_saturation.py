"""How much this CPU's integer kernels change an int8 model's classifier: saturating int16 pairs against the exact sum.

ONNX Runtime's uint8 × int8 kernels sum exactly on a CPU with VNNI and in
saturating int16 pairs on AVX2 alone (harden.fi.integer_kernel). This prints
which arithmetic each op gets on this machine, then, for the classifier of each
model you bring (a dynamically quantised MatMulInteger or ConvInteger, or a
QOperator/QDQ classifier as the exact analysis finds it), over the first N
images of a dataset: how many of its fault-free accumulators this CPU saturates,
on how many images the scores and the top-1 differ from the exact sum's, and the
accuracy both ways. The "exact sum" column is what the same model computes on a
CPU with VNNI.

    .venv/bin/python tools/kernel_saturation.py MODEL.onnx [MODEL.onnx ...] [--data fashion-mnist:test]
        [--limit 500] [--preprocess identity]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def dynamic_scores(model, x):  # type: ignore[no-untyped-def]
    """(kernel, scores as ONNX Runtime computes them here, scores with the exact sum, accumulators changed, all),
    or None when the model has no dynamically quantised classifier."""
    from harden.fi.dynamic_head import dynamic_classifier
    from harden.fi.exact_dynamic import golden_run

    head = dynamic_classifier(model)
    if head is None:
        return None
    g = golden_run(head, x, ("CPUExecutionProvider",))
    excess = head.kernel.correction(g.xq[:, :, None], head.weight)[..., 0]
    here = head.after(head.layer_output(g.acc, g.m))
    exact = head.after(head.layer_output(g.acc - excess, g.m))
    return head.kernel, here, exact, int(np.count_nonzero(excess)), excess.size, f"{head.op} (dynamic)"


def integer_scores(model, x):  # type: ignore[no-untyped-def]
    """The same for an integer classifier in QOperator format, or the kernel ORT fuses a QDQ graph's into."""
    from harden.errors import HardenError
    from harden.fi.integer_head import IntegerHead, wrap32
    from harden.fi.integer_judges import golden_state
    from harden.fi.qdq_deployed import fused_classifier, is_qdq

    try:
        fused = fused_classifier(model, x) if is_qdq(model) else None
        head = fused.head if fused is not None else IntegerHead(model)
    except HardenError:
        return None
    g = golden_state(head, x)
    excess = head.kernel.correction(g.x, head.weight_fc)
    pixels = g.x.shape[2]
    u = head.pool_sums(head.requantise(wrap32(g.acc - excess)).sum(axis=-1), pixels)
    exact = head.run_tail(u) if head.mixes else head.scores(u)
    here = head.run_tail(g.u) if head.mixes else head.scores(g.u)
    return head.kernel, here, exact, int(np.count_nonzero(excess)), excess.size, head.op


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--preprocess", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from harden.fi.integer_kernel import arithmetic
    from harden.graph.model_input import load_inputs, parse_preprocess
    from harden.graph.onnx_io import load_model
    from harden.provenance import cpu

    print(f"CPU: {cpu()}")
    for op, how in arithmetic().items():
        print(f"  {op:14s} uint8 × int8: {how}")
    print(f"{'model':40s} {'classifier':22s} {'accumulators saturated':>24s} {'images: scores differ':>22s} "
          f"{'top-1 differs':>14s} {'accuracy here':>14s} {'exact sum':>10s}")
    for path in args.models:
        model = load_model(path)
        x, labels = load_inputs(model, args.data, limit=args.limit, preprocess=parse_preprocess(args.preprocess) if args.preprocess else None)
        found = dynamic_scores(model, x) or integer_scores(model, x)
        if found is None:
            print(f"{path:40s} no integer classifier found")
            continue
        kernel, here, exact, changed, total, op = found
        differ = int((here != exact).any(axis=1).sum())
        top1 = int((here.argmax(axis=1) != exact.argmax(axis=1)).sum())
        print(f"{Path(path).name:40s} {op:22s} {f'{changed:,} of {total:,}':>24s} {f'{differ} of {len(x)}':>22s} "
              f"{top1:>14d} {(here.argmax(axis=1) == labels).mean():>14.2%} {(exact.argmax(axis=1) == labels).mean():>10.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
