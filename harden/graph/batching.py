"""Graphs whose images are not independent within a batch, and so must run one image at a time.

Every engine batches: the golden pass, the profile, the evaluation, and the
fault runs, which give each batch row a fault of its own. That is sound only
when each row's result depends on that row alone. A graph quantised by
onnxruntime.quantization.quantize_dynamic breaks this: its
DynamicQuantizeLinear computes one scale and zero point over the whole input
tensor, batch axis included. Batched, one image's values change another
image's quantisation, so its scores depend on which images share its batch,
and a fault in one row (a flipped exponent, a NaN) reaches every other row.
Such a graph, deployed to classify one image at a time, computes each scale
from that image alone; harden runs it that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError

# Ops whose result for one batch row depends on the other rows: a dynamic quantiser's per-tensor scale (the
# ONNX op, and ONNX Runtime's contrib ops that fuse one into a MatMul or an LSTM).
ROW_COUPLING_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")


def row_coupling(model: onnx.ModelProto) -> str | None:
    """Why the model's batch rows depend on each other ("2 DynamicQuantizeLinear"), or None when each image is
    computed from itself alone."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        training = any(a.name == "training_mode" and helper.get_attribute_value(a) for a in node.attribute)
        if node.op_type in ROW_COUPLING_OPS or (node.op_type == "BatchNormalization" and training):
            key = f"{node.op_type} in training mode" if training else node.op_type
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    return ", ".join(f"{count} {op}" for op, count in counts.items())


def images_per_run(model: onnx.ModelProto, batch: int) -> int:
    """How many images one run of the model may carry: `batch`, or 1 for a graph whose rows depend on each other
    (whose outputs would otherwise depend on which images share a batch)."""
    return 1 if row_coupling(model) else batch


def replicate(model: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """`copies` copies of the graph side by side in one model, sharing its initializers: input or output T of
    copy j is named 'T@j'.

    Each copy runs the very nodes, at the very shapes, of one image run alone,
    so ONNX Runtime gives each the bits that a run of that image alone gives
    (tests/graph/test_batching.py checks it), while one call carries `copies`
    images. A small graph whose rows are coupled needs that: run one image per
    call, it spends more on each call than on its arithmetic.
    """
    graph = model.graph
    shared = {t.name for t in graph.initializer}
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise HardenError("cannot run copies of a graph with subgraphs (If, Loop, Scan) side by side")
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    for j in range(copies):
        def rename(name: str) -> str:
            return name if not name or name in shared else f"{name}@{j}"

        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{node.name}@{j}" if node.name else ""
            copy.input[:] = [rename(t) for t in node.input]
            copy.output[:] = [rename(t) for t in node.output]
            nodes.append(copy)
        for values, into in ((graph.input, inputs), (graph.output, outputs)):
            for value in values:
                if value.name in shared:
                    continue
                renamed = onnx.ValueInfoProto()
                renamed.CopyFrom(value)
                renamed.name = rename(value.name)
                into.append(renamed)
    out = helper.make_model(helper.make_graph(nodes, f"{graph.name}_x{copies}", inputs, outputs,
                                              list(graph.initializer)),
                            opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


class RowRunner:
    """Runs a graph on many images, each as if alone, `copies` images per ONNX Runtime call (`replicate`)."""

    def __init__(self, model: onnx.ModelProto, copies: int = 64,
                 providers: Sequence[str] = ("CPUExecutionProvider",), opt_level: str = "disable") -> None:
        from harden.graph.ort import make_session

        self.copies = copies
        self.inputs = [v.name for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
        self.outputs = [v.name for v in model.graph.output]
        self.session = make_session(replicate(model, copies), providers, opt_level=opt_level, threads=1,
                                    spinning=False)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs for each row of the fed arrays (every input with one row per image), stacked."""
        rows = len(next(iter(feeds.values())))
        names = [f"{o}@{j}" for j in range(self.copies) for o in self.outputs]
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, rows, self.copies):
            # a last, short call repeats its last image in the copies it does not fill
            picks = [min(start + j, rows - 1) for j in range(self.copies)]
            values = self.session.run(names, {f"{name}@{j}": feeds[name][p:p + 1]
                                              for j, p in enumerate(picks) for name in self.inputs})
            used = min(self.copies, rows - start)
            for k in range(len(self.outputs)):
                parts[k].extend(values[j * len(self.outputs) + k] for j in range(used))
        return [np.concatenate(p) for p in parts]
