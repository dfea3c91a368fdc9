"""Opset-dependent node construction for the passes.

The passes add ReduceL2, Clip, Unsqueeze-like reshapes and Max nodes. Their
signatures moved from attributes to inputs across opsets (Clip at 11, ReduceL2
at 18), and zoo models range from opset 7 to 21, so each new node is built in
the form the model's own opset expects instead of upgrading the whole model.
Every node emitted here exists with this meaning since opset 9, which is the
oldest opset the passes accept; older models are upgraded once on entry with
onnx.version_converter (recorded in the provenance).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from harden.errors import HardenError

MIN_OPSET = 9


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise HardenError("the model does not import the default ONNX operator set")


def ensure_min_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int | None]:
    """The model itself, or a copy upgraded to MIN_OPSET; the second value is the original opset when upgraded."""
    version = default_opset(model)
    if version >= MIN_OPSET:
        return model, None
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as err:  # the converter raises plain RuntimeError/ValueError variants
        raise HardenError(f"the model uses opset {version} and cannot be upgraded to {MIN_OPSET}: {err}") from err
    return upgraded, version


def const(name: str, value: np.ndarray | float, dtype: type = np.float32) -> gs.Constant:
    """A graph constant (initializer) with a fixed dtype."""
    return gs.Constant(name, np.ascontiguousarray(np.asarray(value, dtype=dtype)))


def reduce_l2(graph: gs.Graph, opset: int, x: gs.Variable, out: gs.Variable, axis: int, prefix: str) -> gs.Node:
    """ReduceL2 over one axis, keepdims=1; `axes` is an input from opset 18 on."""
    if opset >= 18:
        return graph.layer(op="ReduceL2", name=f"{prefix}/reduce_l2",
                           inputs=[x, const(f"{prefix}/axes", [axis], np.int64)], outputs=[out],
                           attrs={"keepdims": 1})[0]
    return graph.layer(op="ReduceL2", name=f"{prefix}/reduce_l2", inputs=[x], outputs=[out],
                       attrs={"axes": [axis], "keepdims": 1})[0]


def clip(graph: gs.Graph, opset: int, x: gs.Variable, out: gs.Variable, low: float, high: float,
         prefix: str) -> None:
    """Clip to [low, high]; bounds are attributes before opset 11 and inputs after."""
    if opset >= 11:
        graph.layer(op="Clip", name=f"{prefix}/clip", outputs=[out],
                    inputs=[x, const(f"{prefix}/min", low), const(f"{prefix}/max", high)])
    else:
        graph.layer(op="Clip", name=f"{prefix}/clip", inputs=[x], outputs=[out],
                    attrs={"min": float(low), "max": float(high)})
