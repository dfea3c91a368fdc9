"""Values of tensors that a graph computes from constants alone.

Exporters do not always store classifier weights as initializers: caffe2-era zoo
models build them with ConstantOfShape, others pass them through Reshape,
Transpose or Identity. Such a tensor is still a constant of the model, so its
value is computed by running only its ancestor nodes with the ONNX reference
evaluator. A tensor that depends on a graph input is not a weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.reference import ReferenceEvaluator

from harden.errors import HardenError

QUANT_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"})


def ancestors(tensor: gs.Tensor) -> list[gs.Node]:
    """Every node the tensor depends on, in no particular order."""
    seen: dict[int, gs.Node] = {}
    stack = [tensor]
    while stack:
        current = stack.pop()
        for node in current.inputs:
            if id(node) not in seen:
                seen[id(node)] = node
                stack.extend(node.inputs)
    return list(seen.values())


def constant_value(tensor: gs.Tensor, graph: gs.Graph, what: str) -> np.ndarray:
    """The value of a constant tensor, or HardenError saying why it is not one."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    nodes = ancestors(tensor)
    if not nodes:
        raise HardenError(f"{what} {tensor.name!r} is a graph input, not a constant; "
                          "the pass needs weights stored in the model")
    quant = sorted({n.op for n in nodes} & QUANT_OPS)
    if quant:
        raise HardenError(f"{what} {tensor.name!r} is quantised ({', '.join(quant)}); "
                          "quantised classifiers are not supported: rewrite the float model, then quantise")
    for node in nodes:
        for inp in node.inputs:
            if not isinstance(inp, gs.Constant) and not inp.inputs and inp.name:
                raise HardenError(f"{what} {tensor.name!r} depends on the graph input {inp.name!r}; "
                                  "the pass needs constant weights")
    sub = gs.Graph(nodes=nodes, inputs=[], outputs=[tensor], opset=graph.opset).toposort()
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    try:
        (value,) = ReferenceEvaluator(model).run(None, {})
    except Exception as err:  # the reference evaluator raises whatever its op kernels raise
        raise HardenError(f"cannot evaluate the constant {what} {tensor.name!r}: {err}") from err
    return np.asarray(value)
