"""Does `harden inject` work on the architectures users bring? torchvision models, random weights, small images.

For each architecture (built from a fixed seed, exported with torch's ONNX
exporter at opset 17):
1. The cone engine's scores are checked bit for bit against a node-by-node
   whole-graph run of the same kernels (the tests' check, on 8 activation
   sites spread over the network, 6 faults each: bit flips, NaN and ±inf).
2. `harden inject` runs a default campaign (activations and weights, every
   layer) on 40 random images labelled with the model's own predictions, with
   --threads 1 and again with --threads 2: both must finish with exit code 0
   and write the same file, byte for byte.
The weights are random, so the SDC rates mean nothing; this is about coverage,
exactness and not crashing. It prints one line per model and a summary.
With --float16, each model is first converted to a float16 graph
(onnxconverter-common, float16 input and scores) and the campaign flips fp16
bits; the exactness check then lets a NaN score carry any payload (see
tests/fi/test_cone.py's _same_bits). With --int8, each model is quantised
(onnxruntime.quantization's quantize_static defaults: QDQ, int8 activations,
int8 weights, calibrated on its 40 images) and the campaign flips the stored
integers. --qoperator does the same in QOperator format (QLinearConv, QGemm,
QLinearAdd: the model zoo's int8 format), where every layer runs in ONNX
Runtime's integer kernels. --dynamic quantises each model with quantize_dynamic
(int8 weights; each layer's input quantised at run time, so every run takes one
image: harden.graph.batching). --exact also runs the exact final-layer analysis
(`harden.fi.exact_onnx.analyse_model`) on the 40 images, or prints why it
refuses the model: which classifiers it reaches, in each precision.

    .venv/bin/python tools/architecture_sweep.py [--models mobilenet_v3_small,swin_t] [--injections 16]
        [--work /tmp/harden-architecture-sweep] [--skip-campaign] [--exact] [--float16 | --int8 | --qoperator | --dynamic]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def builders() -> dict[str, tuple[Callable[[], object], int]]:
    """Architecture name → (constructor with 10 classes, image side)."""
    import torchvision.models as tv
    from torchvision.models.vision_transformer import VisionTransformer

    return {
        "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), 64),
        "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), 64),
        "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), 64),
        "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), 64),
        "regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), 64),
        "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), 64),
        "resnext50_32x4d": (lambda: tv.resnext50_32x4d(num_classes=10), 64),
        "densenet121": (lambda: tv.densenet121(num_classes=10), 64),
        "googlenet": (lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True), 64),
        "convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), 64),
        # torchvision zero-initialises the ViT head, which ties every score: give it random weights
        "vit_tiny": (lambda: _random_head(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                            hidden_dim=32, mlp_dim=64, num_classes=10)), 32),
        "swin_t": (lambda: tv.swin_t(num_classes=10), 64),
    }


def _random_head(net):  # type: ignore[no-untyped-def]
    import torch

    torch.nn.init.normal_(net.heads.head.weight, std=0.5)
    return net


def export(name: str, work: Path) -> tuple[Path, Path]:
    """The architecture as ONNX, and an npz of 40 random images labelled with its own predictions."""
    import onnxruntime as ort
    import torch

    build, side = builders()[name]
    torch.manual_seed(0)
    net = build().eval()  # type: ignore[attr-defined]
    path, data = work / f"{name}.onnx", work / f"{name}.npz"
    torch.onnx.export(net, (torch.randn(1, 3, side, side),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    x = np.random.default_rng(1).random((40, 3, side, side)).astype(np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].argmax(axis=1)
    np.savez(data, x=x, y=y)
    return path, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(builders()), help="comma-separated architecture names")
    parser.add_argument("--injections", type=int, default=16, help="injections per layer in the campaign")
    parser.add_argument("--work", default="/tmp/harden-architecture-sweep")
    parser.add_argument("--skip-campaign", action="store_true", help="only the bit-exactness check")
    parser.add_argument("--exact", action="store_true",
                        help="also run the exact final-layer analysis on the 40 images, or say why it refuses")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--float16", action="store_true", help="sweep float16 conversions of the models")
    precision.add_argument("--int8", action="store_true", help="sweep int8 (QDQ) quantisations of the models")
    precision.add_argument("--qoperator", action="store_true",
                           help="sweep int8 quantisations in QOperator format (integer layers)")
    precision.add_argument("--dynamic", action="store_true",
                           help="sweep dynamic int8 quantisations (quantize_dynamic: integer weights)")
    args = parser.parse_args()

    import onnx

    sys.path.insert(0, str(ROOT))
    from harden.errors import HardenError
    from tests.fi.test_cone import _check_against_whole_graph

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in args.models.split(","):
        path, data = export(name, work)
        x = np.load(data)["x"][:3]
        if args.float16:
            from onnxconverter_common import float16

            half = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=False)
            path = path.with_suffix(".fp16.onnx")
            onnx.save(half, str(path))
            x = x.astype(np.float16)
        if args.int8 or args.qoperator or args.dynamic:
            try:
                path = quantise(path, np.load(data)["x"], qoperator=args.qoperator, dynamic=args.dynamic)
            except Exception as err:  # the quantiser's failure, not the injector's
                print(f"{name:20s} quantisation FAILED: {type(err).__name__}: {err}", flush=True)
                failures.append(name)
                continue
        started = time.perf_counter()
        try:
            _check_against_whole_graph(onnx.load(str(path)), x, faults=6, max_sites=8, any_nan=args.float16)
            exact = "bit-exact"
        except AssertionError as err:
            exact = f"DIFFERS at {err}"
            failures.append(name)
        except HardenError as err:  # e.g. a float16 conversion that ONNX Runtime cannot load
            print(f"{name:20s} FAILED: {err}", flush=True)
            failures.append(name)
            continue
        line = f"{name:20s} cone {exact} ({time.perf_counter() - started:.0f} s)"
        if args.exact:
            line += "; " + exact_analysis(onnx.load(str(path)), np.load(data)["x"].astype(x.dtype))
        if not args.skip_campaign:
            import json

            outs, seconds = [], []
            for threads in (1, 2):  # the file must not depend on the thread count
                stem = path.stem
                outs.append(work / f"{stem}.jsonl" if threads == 1 else work / f"{stem}.threads{threads}.jsonl")
                started = time.perf_counter()
                run = subprocess.run([sys.executable, "-m", "harden", "inject", str(path), "--data", f"npz:{data}",
                                      "--preprocess", "identity", "--injections", str(args.injections),
                                      "--threads", str(threads), "--out", str(outs[-1]), "--fresh", "--no-progress",
                                      "--json"], capture_output=True, text=True, cwd=ROOT)
                seconds.append(time.perf_counter() - started)
                if run.returncode != 0:
                    line += f"; campaign FAILED: {(run.stderr.strip().splitlines() or ['?'])[-1]}"
                    failures.append(name)
                    break
            else:
                kinds = [layer["kind"] for layer in json.loads(run.stdout)["layers"]]
                same = outs[0].read_bytes() == outs[1].read_bytes()
                line += (f"; campaign: {kinds.count('activation')} activation and {kinds.count('weight')} weight "
                         f"sites in {seconds[0]:.0f} s (1 thread), {seconds[1]:.0f} s (2); "
                         + ("same file" if same else "FILES DIFFER between 1 and 2 threads"))
                if not same:
                    failures.append(name)
        print(line, flush=True)
    print(f"{len(args.models.split(',')) - len(set(failures))} of {len(args.models.split(','))} architectures pass"
          + (f"; failing: {', '.join(dict.fromkeys(failures))}" if failures else ""))


def exact_analysis(model: object, x: np.ndarray) -> str:
    """The exact final-layer analysis's kind of head, faults and time, or its one-line refusal."""
    from harden.errors import HardenError
    from harden.fi.exact_onnx import analyse_model

    try:
        result = analyse_model(model, x)  # type: ignore[arg-type]
    except HardenError as err:
        return f"exact: refused ({err})"
    return (f"exact: {result.head} head, {result.total_faults:,} faults, SDC "
            f"{100 * result.total_sdc / max(1, result.total_faults):.3f}%, in {result.seconds:.1f} s")


def quantise(path: Path, images: np.ndarray, qoperator: bool = False, dynamic: bool = False) -> Path:
    """The model quantised to int8 (quantize_static's defaults: QDQ format, or QOperator), calibrated on
    `images`; or quantised dynamically (quantize_dynamic's defaults, which need no calibration)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    if dynamic:
        out = path.with_suffix(".dynamic.onnx")
        quantize_dynamic(str(path), str(out))
        return out

    name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    fixed = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0].dim_value
    step = fixed or 8

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: images[i:i + step]} for i in range(0, len(images), step)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = path.with_suffix(".qop.onnx" if qoperator else ".int8.onnx")
    source = path
    if qoperator:  # its Conv quantiser needs every bias as an initializer: pre-process, as ORT's docs advise
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source = path.with_suffix(".pre.onnx")
        quant_pre_process(str(path), str(source), skip_symbolic_shape=True)
    quantize_static(str(source), str(out), Reader(),
                    quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ)
    return out


if __name__ == "__main__":
    main()
