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

import onnx
from onnx import helper

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
