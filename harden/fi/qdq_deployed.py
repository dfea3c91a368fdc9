"""A QDQ graph's classifier as ONNX Runtime runs it: fused into one integer kernel.

A QDQ graph declares each quantised layer in float: DequantizeLinear of the
stored input, weight and bias, a float Gemm or MatMul, and a QuantizeLinear of
its output. ONNX Runtime does not run it that way. At its default optimisation
level it replaces the group with one integer kernel (QGemm, QLinearMatMul) that
accumulates in int32 and requantises once, as a QOperator graph's layer does.
So the exact integer analysis (harden.fi.exact_integer) applies to what is
deployed. This module has ONNX Runtime save the graph it fused (level
`extended`, or `all`, on the analysis's providers), checks that this graph gives
the deployed scores (level `all`) bit for bit on every analysed image, and reports
each site under the name the QDQ graph declares, which is the sampled
campaign's name for it: the stored weight and bias keep their names, and the
input and output are the QuantizeLinear outputs around the declared layer.

The fused kernels take uint8 activations: ONNX Runtime stores an int8
activation as its value + 128. That is its bit pattern with the top bit
flipped, so flipping bit b of one flips bit b of the other, and each bit's
counts are those of the declared int8 tensor.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.exact import ExactResult
from harden.fi.exact_integer import analyse_head
from harden.fi.integer_head import IntegerHead
from harden.fi.integer_projection import Projection, find_projection
from harden.graph.ort import make_session
from harden.graph.parallel import run_model

# the layers a QDQ graph declares in float, which ONNX Runtime fuses into QGemm, QLinearMatMul or QLinearConv
DECLARED = frozenset({"Gemm", "MatMul", "Conv"})


def is_qdq(model: onnx.ModelProto) -> bool:
    """Whether the model declares quantised layers with QuantizeLinear/DequantizeLinear pairs."""
    return any(n.op_type == "DequantizeLinear" for n in model.graph.node)


class Fused(NamedTuple):
    """The graph ONNX Runtime runs in place of a QDQ graph, and the integer classifier in it."""

    model: onnx.ModelProto
    head: IntegerHead


def fused_classifier(model: onnx.ModelProto, inputs: np.ndarray, batch: int = 64,
                     providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> Fused | None:
    """The integer kernel ONNX Runtime runs for the QDQ graph's classifier, in a saved graph that gives the
    deployed scores on `inputs` bit for bit; None where ORT leaves the classifier in float (one left out of
    quantisation, say: the float32 analysis covers that one).

    The graph is saved at level `extended` (every fusion of quantised layers, before layout changes specific
    to this CPU), or where that graph's float layers round differently from the deployed ones, at `all`
    (which may move the classifier into a layout the analysis does not read)."""
    found, refusal = None, None
    for level in ("extended", "all"):
        fused = fused_graph(model, providers, level)
        try:
            found = Fused(fused, IntegerHead(fused))
            _check_deployed(model, fused, inputs, batch, providers, threads)
            return found
        except HardenError as err:
            refusal = err if found is not None else refusal
    if found is not None and refusal is not None:
        raise refusal
    return None


def analyse_qdq_head(model: onnx.ModelProto, fused: Fused, inputs: np.ndarray, batch: int = 64,
                     providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> ExactResult:
    """Exact SDC counts of every single-bit fault in a QDQ graph's classifier, as ONNX Runtime deploys it
    (`fused`, from `fused_classifier`)."""
    projection = find_projection(fused.head)
    names = declared_names(model, fused.head)
    if projection is not None:
        names.update(declared_names(model, projection))
    result = analyse_head(fused.head, projection, inputs, batch, providers, threads,
                          origin="fused from QDQ by ONNX Runtime")
    for site in result.sites:
        site.tensor, site.fmt, site.layer = names[site.tensor]
    return result


def fused_graph(model: onnx.ModelProto, providers: Sequence[str], level: str = "extended") -> onnx.ModelProto:
    """The graph ONNX Runtime runs after its optimisations at `level`, as it saves it."""
    with tempfile.TemporaryDirectory(prefix="harden-fused-") as tmp:
        path = Path(tmp) / "fused.onnx"
        make_session(model, providers=providers, opt_level=level, threads=1, save_optimized=str(path))
        return onnx.load(str(path))


def declared_names(model: onnx.ModelProto, head: IntegerHead | Projection) -> dict[str, tuple[str, str, str]]:
    """For each tensor of a fused integer layer (the classifier, or its projection), the name and stored type
    the QDQ graph gives it, and the name of the layer it declares."""
    graph = model.graph
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)

    def fail(what: str) -> HardenError:
        return HardenError(f"exact analysis: ONNX Runtime fused this QDQ graph's classifier into {head.op}, but "
                           f"{what}, so its sites cannot be named as the graph declares them")

    for name, value in ((head.weight_name, head.stored_weight), (head.bias_name, head.bias)):
        if name and (name not in stored or not np.array_equal(stored[name], value)):
            raise fail(f"{name!r} is not one of the graph's stored integers")
    layer = next((r for dq in readers.get(head.weight_name, []) if dq.op_type == "DequantizeLinear"
                  for r in readers.get(dq.output[0], []) if r.op_type in DECLARED), None)
    if layer is None:
        raise fail(f"no {' or '.join(sorted(DECLARED))} reads the dequantised {head.weight_name!r}")
    source = producer.get(layer.input[0])
    sink = next((r for r in readers.get(layer.output[0], []) if r.op_type == "QuantizeLinear"), None)
    if source is None or source.op_type != "DequantizeLinear" or sink is None:
        raise fail(f"{layer.op_type} {layer.name!r} does not read a DequantizeLinear and feed a QuantizeLinear")

    def stored_type(node: onnx.NodeProto) -> str:
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        return stored[zero_point].dtype.name if zero_point in stored else "uint8"

    names = {head.input: (source.input[0], stored_type(source), layer.name),
             head.output: (sink.output[0], stored_type(sink), layer.name),
             head.weight_name: (head.weight_name, head.stored_weight.dtype.name, layer.name)}
    if head.bias_name:
        names[head.bias_name] = (head.bias_name, head.bias.dtype.name, layer.name)
    return names


def _check_deployed(model: onnx.ModelProto, fused: onnx.ModelProto, inputs: np.ndarray, batch: int,
                    providers: Sequence[str], threads: int) -> None:
    """The saved fused graph must give the scores the QDQ graph gives at ONNX Runtime's default level."""
    (deployed,) = run_model(model, inputs, [model.graph.output[0].name], "all", batch, threads, providers)
    (mine,) = run_model(fused, inputs, [fused.graph.output[0].name], "disable", batch, threads, providers)
    deployed, mine = (np.asarray(v, np.float32).reshape(len(inputs), -1).view(np.uint32) for v in (deployed, mine))
    differ = int((deployed != mine).any(axis=1).sum())
    if differ:
        raise HardenError(f"exact analysis: the graph ONNX Runtime fused from this QDQ graph does not give the "
                          f"deployed scores on {differ} of {len(inputs)} images; nothing can be judged exactly")
