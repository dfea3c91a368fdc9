"""Does `harden certify` run on the ONNX model zoo's graphs? The onnx wheel's "light" copies, with weights.

The onnx wheel ships opset-9 copies of the model zoo's classic classifiers (ResNet-50, VGG-19, DenseNet-121,
SqueezeNet, Inception v1/v2, ShuffleNet, AlexNet, ZFNet-512) whose weights are ConstantOfShape placeholders:
every weight is 0.02, so every image gets the same scores and no image could pass the paper's filter. This
script gives each placeholder seeded random values that fit its role (He-normal convolution weights,
BatchNorm statistics near the identity, small biases), labels random images with the model's own top-1, and
runs `certify` on each graph (every activation and weight site, a few injections each), then the exact
final-layer analysis of every site of the classifier (weight, bias, input, output). What it checks is reach
— the graph structures load, inject, and get an exact analysis or a stated reason — not SDC rates, which
mean nothing for random weights. Random weights also leave images within float32 rounding of a tie, which
the exact analysis must handle without stalling; the line gives its time and how many faults it recomputed.
It then compares the final layer's exact SDC fraction as the graph is, range-clipped by `harden rewrite
--range-clip` (peaks from the same images), and under the injector's `--clamp range`, which also clamps a
faulty weight to ± max|w|: the graph's clips bound activations only.

With --qoperator, each graph is first quantised to int8 in QOperator format (as the model zoo ships its
int8 models; tools/architecture_sweep.py's `quantise`, calibrated on the same images), and certify flips the
integers it stores. Its scores are compared with the float graph's labels, and the exact analysis is the
integer one (harden.fi.exact_integer), with no range-clip comparison. With --dynamic, each graph is
quantised by quantize_dynamic (int8 weights, activations quantised at run time; harden.fi.exact_dynamic for
the exact analysis), likewise without the range-clip comparison.

    .venv/bin/python tools/zoo_sweep.py [--injections 4] [--images 6] [--out /tmp/harden-zoo-sweep]
        [--qoperator | --dynamic]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from harden.fi.exact import ExactResult

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _role(model: onnx.ModelProto, tensor: str) -> tuple[str, int]:
    """(op type, input index) of the first real reader of `tensor`, looking through Unsqueeze/Reshape."""
    for node in model.graph.node:
        if tensor in node.input:
            if node.op_type in ("Unsqueeze", "Reshape") and node.input[0] == tensor:
                return _role(model, node.output[0])
            return node.op_type, list(node.input).index(tensor)
    return "", -1


def _value(role: tuple[str, int], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray | None:
    """Seeded values for a placeholder read as `role`; None keeps the placeholder (not a weight)."""
    op, index = role
    normal = rng.standard_normal(shape)
    if op == "Conv" and index == 1:
        return normal * np.sqrt(2.0 / max(1, int(np.prod(shape[1:]))))
    if op == "Gemm" and index == 1:
        return normal / np.sqrt(max(shape))
    if op == "BatchNormalization":
        return {1: 1 + 0.1 * normal, 2: 0.1 * normal, 3: 0.1 * normal, 4: 1 + 0.1 * np.abs(normal)}.get(index)
    if op == "Mul":  # DenseNet's BatchNorm written out as Mul and Add
        return 1 + 0.1 * normal
    if op in ("Conv", "Gemm", "Add"):
        return 0.01 * normal
    return None


def with_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of a light zoo graph whose ConstantOfShape weight placeholders hold seeded random values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    shapes = {t.name: tuple(int(v) for v in numpy_helper.to_array(t)) for t in graph.initializer
              if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1}  # the placeholders' shapes
    rng = np.random.default_rng(seed)
    kept, made = [], []
    for node in graph.node:
        value = None
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            value = _value(_role(out, node.output[0]), shapes[node.input[0]], rng)
        if value is None:
            kept.append(node)
        else:
            made.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(made)
    read = {name for node in graph.node for name in node.input}
    live = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(live)
    image = next(i for i in graph.input if i.name not in {t.name for t in graph.initializer} | set(shapes))
    del graph.input[:]
    graph.input.append(image)  # IR 4 and later need no initializer listed as an input
    out.ir_version = max(out.ir_version, 4)
    onnx.checker.check_model(out)
    return out


def clip_comparison(model: onnx.ModelProto, x: np.ndarray, plain: ExactResult) -> str:
    """Exact SDC of the final layer as it is, with the graph range-clipped (rewrite --range-clip, peaks from
    the same images), and under the injector's --clamp range, which also clamps a faulty weight to ± max|w|."""
    from harden.fi.exact_onnx import analyse_model
    from harden.graph.range_clip import RangeClipPass

    from harden.errors import HardenError

    try:
        clipped = f"{sdc(analyse_model(RangeClipPass(x).run(model), x)):.3%}"
    except HardenError as err:
        clipped = f"not analysed ({err})"
    ranged = analyse_model(model, x, policy="range")
    return f"SDC {sdc(plain):.3%}, range-clipped graph {clipped}, --clamp range {sdc(ranged):.3%}"


def sdc(result: ExactResult) -> float:
    """The SDC fraction over every fault of the analysis."""
    return result.total_sdc / result.total_faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--injections", type=int, default=4, help="injections per site")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--out", default="/tmp/harden-zoo-sweep")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--qoperator", action="store_true", help="certify int8 quantisations in QOperator format")
    precision.add_argument("--dynamic", action="store_true", help="certify dynamic int8 quantisations")
    args = parser.parse_args()

    from architecture_sweep import quantise

    import onnxruntime as ort

    from harden.errors import HardenError
    from harden.fi.exact_onnx import analyse_model
    from harden.report.certify import CertifyConfig, certify

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    failures = 0
    for path in sorted(LIGHT.glob("light_*.onnx")):
        name = path.stem.removeprefix("light_")
        model = with_weights(onnx.load(str(path)))
        onnx.save(model, out / f"{name}.onnx")
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
        x = np.random.default_rng(1).random((args.images, *shape[1:]), dtype=np.float32)
        scores = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0]
                                 for i in range(len(x))]).reshape(len(x), -1)
        np.savez(out / f"{name}.npz", x=x, y=scores.argmax(axis=1))
        certified_path = (quantise(out / f"{name}.onnx", x, qoperator=args.qoperator, dynamic=args.dynamic)
                          if args.qoperator or args.dynamic else out / f"{name}.onnx")
        started = time.perf_counter()
        try:
            report = certify(CertifyConfig(model=str(certified_path), data=f"npz:{out / name}.npz",
                                           output=str(out / f"{name}-report"), preprocess="identity",
                                           injections=args.injections, exact=False, latency_runs=2,
                                           progress=False))
        except HardenError as err:
            failures += 1
            print(f"{name:14s} FAILED: {err}")
            continue
        layers = report.model("model").campaign.layers
        certified = time.perf_counter() - started
        try:
            result = analyse_model(onnx.load(str(certified_path)), x)
            how = "rerun through ONNX Runtime" if result.head.startswith("dynamic") else "in float32"
            exact = (f"exact: {result.head} head, {'/'.join(s.role for s in result.sites)}, "
                     f"{result.total_faults:,} faults ({result.recomputed:,} {how}) in {result.seconds:.0f} s")
            if not (args.qoperator or args.dynamic):
                exact += "; " + clip_comparison(model, x, result)
        except HardenError as err:
            exact = f"exact skipped: {err}"
        print(f"{name:14s} {len(layers)} sites, {sum(layer.sdc.n for layer in layers)} injections in "
              f"{certified:.0f} s; {exact}")
    print(f"{len(list(LIGHT.glob('light_*.onnx'))) - failures} of {len(list(LIGHT.glob('light_*.onnx')))} "
          "zoo graphs certified")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
