"""How fast is the exact analysis of an integer classifier at ImageNet size, against brute force?

Builds an ImageNet-shaped classifier head (2048 features → 1000 classes, random
weights, ReLU features), quantises it with `quantize_static` in QOperator
format (QGemm, int8 weight, int32 bias), and runs the exact analysis
(`harden.fi.exact_onnx.analyse_model`) over N images: every single-bit fault of
the weight, bias, input and output. The reference is brute force: each fault
as one ONNX Runtime run of the quantised head on the N images. The script
times brute force on a sample of weight faults, checks that their outcomes
equal the exact analysis's, and prints both rates and their ratio.

    .venv/bin/python tools/bench_exact_integer.py [--images 64] [--features 2048] [--classes 1000] [--sample 200]

With --text-head E the head is the text-guided one (projection to E dimensions,
L2 normalisation, cosine classifier, scale), and the analysis covers its
projection too (`harden.fi.integer_projection`); it is timed without brute force.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

from harden.fi.bitflip import flip
from harden.fi.integer_head import IntegerHead
from harden.fi.integer_judges import golden_state
from harden.fi.exact_onnx import analyse_model
from harden.graph.ort import make_session


def head_model(features: int, classes: int, images: np.ndarray, work: Path, embed: int = 0) -> onnx.ModelProto:
    """ReLU features → Gemm, quantised in QOperator format and calibrated on `images`; with `embed`, the text
    head: a projection to `embed` dimensions, L2 normalisation, the cosine classifier and its scale."""
    rng = np.random.default_rng(0)
    width = embed or features
    weight = (rng.standard_normal((classes, width)) / np.sqrt(width)).astype(np.float32)
    bias = (rng.standard_normal(classes) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gemm", ["r", "w", "b"], ["logits"], transB=1)]
    if embed:
        projection = (rng.standard_normal((embed, features)) / np.sqrt(features)).astype(np.float32)
        inits = [numpy_helper.from_array(projection, "p"), numpy_helper.from_array(bias[:embed] * 0 + 0.01, "pb"),
                 numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
                 numpy_helper.from_array(weight.T.copy(), "wt"), numpy_helper.from_array(np.float32(30.0), "s")]
        nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gemm", ["r", "p", "pb"], ["z"], transB=1),
                 helper.make_node("ReduceL2", ["z"], ["n"], axes=[1], keepdims=1),
                 helper.make_node("Max", ["n", "eps"], ["m"]), helper.make_node("Div", ["z", "m"], ["zh"]),
                 helper.make_node("MatMul", ["zh", "wt"], ["c"]), helper.make_node("Mul", ["c", "s"], ["logits"])]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, work / "head.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": images}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(work / "head.onnx"), str(work / "head.qop.onnx"), Reader(), quant_format=QuantFormat.QOperator)
    return onnx.load(work / "head.qop.onnx")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--sample", type=int, default=200, help="weight faults timed by brute force")
    p.add_argument("--text-head", type=int, default=0, metavar="E",
                   help="the text head with an E-d projection instead (timed, without brute force)")
    args = p.parse_args()
    x = np.abs(np.random.default_rng(1).standard_normal((args.images, args.features))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        model = head_model(args.features, args.classes, x, Path(tmp), args.text_head)
    started = time.perf_counter()
    result = analyse_model(model, x)
    exact_s = time.perf_counter() - started
    print(f"exact ({result.head}): {result.total_faults:,} faults × images in {exact_s:.1f} s "
          f"({result.total_faults / exact_s:,.0f}/s); SDC {100 * result.total_sdc / result.total_faults:.4f}%")
    for s in result.sites:
        print(f"  {s.role:<11} {s.fmt:<6} {s.total_faults:>14,} faults  SDC {100 * s.sdc_fraction:.4f}%")
    if args.text_head:
        return

    # brute force: the quantised head with the weight fed per run, one fault at a time on all images
    head = IntegerHead(model)
    g = golden_state(head, x)
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    kept = [t for t in graph.graph.initializer if t.name != head.weight_name]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    graph.graph.input.append(helper.make_tensor_value_info(head.weight_name, TensorProto.INT8, None))
    session = make_session(graph, opt_level="disable")
    rng = np.random.default_rng(2)
    stored = head.stored_weight
    elems, bits = rng.integers(0, stored.size, args.sample), rng.integers(0, 8, args.sample)
    brute_sdc = np.zeros(args.sample, np.int64)
    started = time.perf_counter()
    for i, (k, bit) in enumerate(zip(elems.tolist(), bits.tolist())):
        faulty = stored.copy()
        faulty.flat[k] = flip(stored.reshape(-1)[k:k + 1], np.array([bit]), "int8")[0]
        scores = session.run(None, {"x": x, head.weight_name: faulty})[0]
        brute_sdc[i] = int((np.argmax(scores, axis=1) != g.top1).sum())
    brute_s = (time.perf_counter() - started) / (args.sample * len(x))
    # the same faults, decided as the exact analysis decides them
    xz = g.x[:, :, 0].astype(np.int64) - head.zx  # a Gemm: one pixel
    c, f = (np.unravel_index(elems, stored.shape)[::-1] if not head.transposed else np.unravel_index(elems, stored.shape))
    flipped = flip(stored.reshape(-1)[elems], bits, "int8").astype(np.int64) - stored.reshape(-1)[elems]
    agree = 0
    for i in range(args.sample):
        acc = g.acc[:, c[i], 0] + xz[:, f[i]] * flipped[i]
        value = head.requantise(acc[:, None, None], np.array([c[i]]))[:, 0, 0]
        mine = g.judge.sdc(np.arange(len(x)), np.full(len(x), c[i]), value)
        agree += int(mine.sum() == brute_sdc[i])
    print(f"brute force: {1 / brute_s:,.0f} faults × images/s over {args.sample} sampled weight faults; "
          f"same SDC count on {agree} of {args.sample}")
    print(f"exact / brute force: {result.total_faults / exact_s * brute_s:,.0f}x")


if __name__ == "__main__":
    main()
