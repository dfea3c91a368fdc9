"""The same campaign on float32 models, their float16 conversions and their int8 quantisations.

Users deploy the same classifier in several precisions: float32, a float16
graph (onnxconverter-common's `convert_float_to_float16`), or an int8 one
(onnxruntime.quantization's `quantize_static`, its default int8 activations
and int8 weights, calibrated on training images), in QDQ format (its default:
float layers between QuantizeLinear and DequantizeLinear) or in QOperator
format (integer layers: QLinearConv, QGemm), or quantised dynamically
(`quantize_dynamic`: int8 weights, activations quantised at run time, one image
per run; column `int8-dyn`). `harden inject` flips the bits each graph stores: fp32, fp16, or the stored integers (int8/uint8 activations,
int8 weights, int32 biases). This tool makes the conversions of
each model (default: the demo's baseline and text-guided models, after
`make demo`), runs one campaign per model and precision with the same seed, and
prints per precision: accuracy on the evaluation images, top-1 agreement with
float32, SDC over all injections and over the classifier head's sites (with
intervals), the non-finite rate, the campaign's time, ONNX Runtime's latency
for the whole graph (`harden.report.cost.latency_ms`: level 'all', one thread,
median of 10 runs of one image), the exact final-layer SDC fraction over the
campaign's kept images (`harden.fi.exact_onnx.analyse_model`: float32 graphs,
float16 ones in their stored fp16 values (`harden.fi.exact_half`), a QOperator
graph's integer classifier, and the integer kernel ONNX Runtime fuses a QDQ
graph's classifier into), and how closely the
injector's node-by-node run matches ONNX Runtime's whole graph as deployed
(`node_fidelity`). Under --clamp range the int8 graphs are skipped: the clamp
applies to float values.

    .venv/bin/python tools/precision_sweep.py
    .venv/bin/python tools/precision_sweep.py --models A.onnx B.onnx --data fashion-mnist:test --clamp range
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnxconverter_common import float16
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from harden.demo.table import head_nodes, pooled
from harden.fi.campaign import inject_dataset
from harden.fi.config import CampaignConfig
from harden.errors import HardenError
from harden.fi.exact_onnx import analyse_model
from harden.fi.graphinfo import GraphInfo, named_copy
from harden.fi.journal import JournalContents
from harden.fi.nodes import NodeSessions, golden_pass
from harden.fi.stats import Rate
from harden.fi.summary import CampaignSummary
from harden.graph.batching import images_per_run
from harden.graph.model_input import load_inputs
from harden.graph.onnx_io import load_model
from harden.graph.ort import make_session, run_batched
from harden.report.cost import latency_ms
from harden.report.gates import pooled_sdc


def to_float16(model: Path, work: Path) -> Path:
    """The model as a float16 graph (float16 input and scores too), written once into `work`."""
    out = work / f"{model.stem}.float16.onnx"
    if not out.exists():
        onnx.save(float16.convert_float_to_float16(onnx.load(model), keep_io_types=False), out)
    return out


def to_int8(model: Path, work: Path, calibration: str, images: int, qoperator: bool = False) -> Path:
    """The model quantised to int8 (onnxruntime.quantization's defaults, in QDQ or QOperator format),
    calibrated on `images` images of `calibration`, written once into `work`."""
    out = work / f"{model.stem}.{'qop' if qoperator else 'int8'}.onnx"
    if not out.exists():
        proto = load_model(model)
        x, _ = load_inputs(proto, calibration, images)
        name = proto.graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{name: x[i:i + 32]} for i in range(0, len(x), 32)])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        quantize_static(str(model), str(out), Reader(),
                        quant_format=QuantFormat.QOperator if qoperator else QuantFormat.QDQ)
    return out


def to_dynamic(model: Path, work: Path) -> Path:
    """The model quantised dynamically (int8 weights; each layer's input quantised at run time), written once."""
    out = work / f"{model.stem}.dynamic.onnx"
    if not out.exists():
        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    return out


def top1(model: Path, data: str, limit: int) -> np.ndarray:
    """The model's top-1 class on the first `limit` images of `data` (as a campaign draws them)."""
    proto = load_model(model)
    x, _ = load_inputs(proto, data, limit)
    (scores,) = run_batched(make_session(proto, opt_level="disable"), x, batch=images_per_run(proto, 256))
    return np.argmax(scores.astype(np.float32).reshape(len(x), -1), axis=1)


def node_fidelity(model: Path, data: str, limit: int) -> tuple[float, float]:
    """(top-1 agreement, share of equal scores) of the injector's node-by-node run with ONNX Runtime's whole
    graph at level 'all', as deployed: there ORT fuses a QDQ graph's layers into integer kernels and keeps
    some float16 intermediates in float32, where the injector computes each node as the graph declares it."""
    proto = load_model(model)
    x, _ = load_inputs(proto, data, limit)
    (deployed,) = run_batched(make_session(proto, opt_level="all"), x, batch=images_per_run(proto, 256))
    info = GraphInfo(proto, example=x[:1])
    nodes = golden_pass(NodeSessions(info, ["CPUExecutionProvider"], 1), x, 100, keep=[])[info.scores]
    deployed, nodes = deployed.reshape(len(x), -1), nodes.reshape(len(x), -1)
    return float(np.mean(deployed.argmax(1) == nodes.argmax(1))), float(np.mean(deployed == nodes))


def nonfinite(summary: CampaignSummary) -> float:
    """The share of injections whose scores held NaN or Inf."""
    k = sum(layer.nonfinite.k for layer in summary.layers)
    n = sum(layer.nonfinite.n for layer in summary.layers)
    return k / n if n else float("nan")


def exact_sdc(path: Path, data: str, limit: int, campaign: Path) -> str:
    """The exact SDC fraction over every final-layer fault, on the campaign's kept images; '-' where the
    analysis does not cover the graph."""
    proto = load_model(path)
    x, _ = load_inputs(proto, data, limit)
    journal = JournalContents(campaign)
    kept = np.asarray(journal.evaluation.ids, dtype=np.int64)
    # the format the campaign flipped: fp32, or fp16 in a float16 graph (unset in a quantised one)
    fmt = journal.header["config"]["fault"].get("fmt") or "fp32"
    try:
        result = analyse_model(proto, x[kept], fmt=fmt)
    except HardenError:
        return "-"
    return f"{100 * result.total_sdc / result.total_faults:.3f}%"


def rate(r: Rate) -> str:
    return f"{100 * r.value:.2f}% [{100 * r.low:.2f}, {100 * r.high:.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", type=Path, default=[Path("runs/demo/baseline.onnx"),
                                                               Path("runs/demo/text.onnx")])
    p.add_argument("--data", default="fashion-mnist:test")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--calibration", default="fashion-mnist:train", help="the int8 calibration images")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--injections", type=int, default=300, help="injections per site")
    p.add_argument("--clamp", choices=("none", "range"), default="none")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/harden-precision-sweep"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    config = CampaignConfig(injections=args.injections, clamp=args.clamp, seed=0)
    print(f"{args.data}, {args.limit} images, {args.injections} injections per site, clamp {args.clamp}; each "
          "graph's own bits flipped (fp32, fp16, or int8/uint8/int32 as a quantised graph stores them)")
    print(f"{'model':<14} {'graph':<8} {'accuracy':>9} {'agree':>7} {'SDC, all sites':>26} "
          f"{'SDC, head sites':>26} {'non-finite':>10} {'time':>7} {'ORT ms':>7} {'exact':>7}   "
          "node by node vs ORT's whole graph")
    for model in args.models:
        reference = top1(model, args.data, args.limit)
        head = head_nodes(named_copy(load_model(model)))  # the conversions keep the node names, QOperator's
        # with a suffix: QOperator's, and quantize_dynamic's for a Gemm it splits into MatMulInteger and Add
        head |= {f"{name}{suffix}" for name in head for suffix in ("_quant", "_MatMul_quant")}
        graphs = [("float32", model), ("float16", to_float16(model, args.work))]
        if args.clamp == "none":
            graphs.append(("int8", to_int8(model, args.work, args.calibration, args.calibration_images)))
            graphs.append(("int8-qop", to_int8(model, args.work, args.calibration, args.calibration_images, True)))
            graphs.append(("int8-dyn", to_dynamic(model, args.work)))
        for precision, path in graphs:
            started = time.perf_counter()
            campaign = args.work / f"{model.stem}.{precision}.jsonl"
            summary = inject_dataset(path, args.data, config, campaign,
                                     limit=args.limit, progress=False, threads=args.threads, fresh=True)
            seconds = time.perf_counter() - started
            agree = float(np.mean(top1(path, args.data, args.limit) == reference))
            ev = summary.evaluation
            in_head = [layer.site for layer in summary.layers if layer.node in head]
            same_top1, same_scores = node_fidelity(path, args.data, args.limit)
            proto = load_model(path)
            ms = latency_ms(proto, load_inputs(proto, args.data, 1)[0], runs=10)
            exact = exact_sdc(path, args.data, args.limit, campaign) if args.clamp == "none" else "-"
            print(f"{model.stem:<14} {precision:<8} {100 * ev['correct'] / ev['total']:>8.2f}% {100 * agree:>6.2f}% "
                  f"{rate(pooled_sdc(summary)):>26} {rate(pooled(summary, in_head)):>26} "
                  f"{100 * nonfinite(summary):>9.2f}% {seconds:>6.1f}s {ms:>7.1f} {exact:>7}   top-1 {100 * same_top1:.1f}%, "
                  f"scores {100 * same_scores:.1f}% equal", flush=True)


if __name__ == "__main__":
    main()
