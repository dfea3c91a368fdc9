"""The range-restriction pass (Ranger, Chen et al. 2020), with the injector's own bounds.

For each chosen tensor x with profiled peak p = max |x| over calibration data
(harden.fi.profile.profile_ranges, the function behind `harden inject --clamp range`):

    x' = Clip(Where(IsNaN(x), 0, x), -p, p)

which is exactly harden.fi.profile.clamp_to_range: NaN → 0, ±Inf and
out-of-range values → ±p. Consumers read x'; the chosen tensor keeps its name,
so a fault injected into it is clamped as the campaign assumed. (A tensor that
is also a graph output is renamed instead and the Clip takes its name, so the
model's interface does not change.) On the calibration data no value exceeds
its peak, so the output must equal the original's; ONNX Runtime checks that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from harden.errors import HardenError
from harden.fi.profile import profile_ranges
from harden.fi.graphinfo import bypass_constant_views
from harden.fi.quantised import DYNAMIC_LAYERS, QOPERATOR_LAYERS, rescaled_output
from harden.graph.batching import images_per_run
from harden.graph.locate import import_graph
from harden.graph.opset import clip, const, default_opset, ensure_min_opset
from harden.graph.ort import make_session, run_batched
from harden.graph.passes import copy_model, finish, update_config

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PARITY_IMAGES = 64
PARITY_ATOL = 1e-5


def default_layers(model: onnx.ModelProto) -> list[str]:
    """The activation fault sites of DESIGN's fault model: outputs of Conv, ConvTranspose, Gemm and MatMul, and
    in a dynamically quantised graph each integer layer's rescaled float output, as the injector finds it
    (harden.fi.quantised.rescaled_output, after the same folding of constant views as harden.fi.graphinfo)."""
    view = copy_model(model)
    bypass_constant_views(view)
    nodes = list(view.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    constants = {t.name for t in view.graph.initializer} | {n.output[0] for n in nodes if n.op_type == "Constant"}
    outputs = {o.name for o in view.graph.output}
    layers = []
    for node in nodes:
        if node.op_type in COMPUTE_OPS and node.output:
            layers.append(node.output[0])
        elif node.op_type in DYNAMIC_LAYERS and node.output:
            rescaled = rescaled_output(nodes, consumers, constants, node.output[0], outputs)
            if rescaled is not None:
                layers.append(rescaled)
    return layers


def resolve_layers(model: onnx.ModelProto, layers: Sequence[str] | None) -> list[str]:
    """Tensor names to clip: given as node names or tensor names, or the default compute-node outputs."""
    if not layers:
        chosen = default_layers(model)
        if not chosen:
            raise HardenError("the model has no Conv, ConvTranspose, Gemm, MatMul or dynamically quantised layer to "
                              "range-clip; "
                              "name tensors with --layers")
        return chosen
    by_node = {node.name: node.output[0] for node in model.graph.node if node.name and node.output}
    tensors = {out for node in model.graph.node for out in node.output}
    chosen = []
    for layer in layers:
        if layer in tensors:
            chosen.append(layer)
        elif layer in by_node:
            chosen.append(by_node[layer])
        else:
            raise HardenError(f"--layers: {layer!r} is neither a node nor a tensor of the model")
    return list(dict.fromkeys(chosen))


class RangeClipPass:
    """Insert NaN-to-zero and Clip(±peak) after each chosen layer, peaks profiled on calibration inputs."""

    name = "range-clip"

    def __init__(self, calibration: np.ndarray, layers: Sequence[str] | None = None,
                 calibration_spec: str = "") -> None:
        self.calibration = calibration
        self.layers = list(layers) if layers else None
        self.calibration_spec = calibration_spec
        self.ranges: dict[str, float] = {}
        self.parity_max_abs: float | None = None
        self.upgraded_from: int | None = None

    def config(self) -> dict[str, Any]:
        return {"calibration": self.calibration_spec, "calibration_images": int(len(self.calibration)),
                "ranges": self.ranges, "nan_to_zero": True, "upgraded_from_opset": self.upgraded_from,
                "parity_max_abs": self.parity_max_abs}

    def check(self, model: onnx.ModelProto) -> str | None:
        if len(self.calibration) == 0:
            return "range clip needs calibration images (--data)"
        integer = sorted({n.op_type for n in model.graph.node if n.op_type in QOPERATOR_LAYERS})
        if integer:
            return (f"the model is quantised in QOperator format ({', '.join(integer)}): its layers write integers, "
                    "which their type already bounds; range-clip the float model, then quantise it")
        try:
            ensure_min_opset(model)
            resolve_layers(model, self.layers)
        except HardenError as err:
            return str(err)
        return None

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        reason = self.check(model)
        if reason:
            raise HardenError(reason)
        source, self.upgraded_from = ensure_min_opset(copy_model(model))
        tensors = resolve_layers(source, self.layers)
        self.ranges = profile_ranges(source, self.calibration, tensors)
        graph = import_graph(source)
        opset = default_opset(source)
        variables = graph.tensors()
        outputs = {t.name for t in graph.outputs}
        base = unique_prefix(graph, "harden/range_clip")
        for index, name in enumerate(tensors):
            insert_clip(graph, opset, variables[name], self.ranges[name], f"{base}/{index}", name in outputs)
        result = finish(graph, source, self.name, self.config())
        self.parity_max_abs = check_parity(source, result, self.calibration[:PARITY_IMAGES])
        update_config(result, self.config())
        return result


def unique_prefix(graph: gs.Graph, base: str) -> str:
    """`base`, or `base_2`, `base_3`... so that a second run of the pass cannot reuse a tensor name."""
    names = set(graph.tensors()) | {node.name for node in graph.nodes}
    candidate, n = base, 1
    while any(name.startswith(candidate + "/") for name in names):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def insert_clip(graph: gs.Graph, opset: int, tensor: gs.Variable, peak: float, prefix: str,
                is_output: bool) -> None:
    """Route every consumer of `tensor` through NaN → 0 and Clip(±peak)."""
    if is_output:
        producer = tensor.inputs[0]
        raw = gs.Variable(f"{prefix}/unclipped", dtype=tensor.dtype, shape=tensor.shape)
        producer.outputs[producer.outputs.index(tensor)] = raw
        source, clipped = raw, tensor
    else:
        consumers = list(tensor.outputs)
        source = tensor
        clipped = gs.Variable(f"{prefix}/clipped", dtype=tensor.dtype, shape=tensor.shape)
        for node in consumers:
            for slot, value in enumerate(node.inputs):
                if value is tensor:
                    node.inputs[slot] = clipped
    isnan = gs.Variable(f"{prefix}/isnan", dtype=np.bool_)
    graph.layer(op="IsNaN", name=f"{prefix}/isnan", inputs=[source], outputs=[isnan])
    finite = gs.Variable(f"{prefix}/nan_to_zero", dtype=np.float32)
    graph.layer(op="Where", name=f"{prefix}/where", inputs=[isnan, const(f"{prefix}/zero", [0.0]), source],
                outputs=[finite])
    clip(graph, opset, finite, clipped, -peak, peak, prefix)


def check_parity(original: onnx.ModelProto, clipped: onnx.ModelProto, images: np.ndarray) -> float:
    """On calibration images no value exceeds its peak, so every output must be unchanged."""
    batch = images_per_run(original, 256)
    want = run_batched(make_session(original, opt_level="disable"), images, batch=batch)
    got = run_batched(make_session(clipped, opt_level="disable"), images, batch=batch)
    worst = max(float(np.max(np.abs(g - w))) if g.size else 0.0 for g, w in zip(got, want))
    if not worst <= PARITY_ATOL:
        raise RuntimeError(f"range-clip pass: outputs on calibration data changed by {worst:.3g}")
    return worst
