"""Quantised graphs: the integer tensors that a deployment stores, and how layers read them.

onnxruntime.quantization's default QDQ format keeps every layer in float and
brackets it with QuantizeLinear / DequantizeLinear: a weight is an int8
initializer (a bias an int32 one) that a DequantizeLinear turns into the float
tensor the layer reads, and a layer's output is requantised to int8 (or uint8)
by a QuantizeLinear. ONNX Runtime fuses those into integer kernels, so what
memory holds, and what a bit flip hits, are those integers. harden makes them
the fault sites: a stored integer weight through its DequantizeLinear
(`Dequantized`, folded into the float constant the layer reads), and the
QuantizeLinear output after a layer (`requantised_output`).

In QOperator format (the ONNX model zoo's int8 models) the layers are integer
ops themselves: QLinearConv reads a uint8 map and an int8 weight and writes a
uint8 map. Their stored inputs and outputs are the sites as they are
(`QOPERATOR_LAYERS`), and every node runs in ONNX Runtime's own integer kernels.

quantize_dynamic stores int8 (or uint8) weights only. Each ConvInteger or
MatMulInteger reads its float input through a DynamicQuantizeLinear, which
quantises it at run time, and its int32 output is rescaled to float by a Cast
and a Mul (and a bias Add). The stored weights are sites as they are
(`DYNAMIC_LAYERS`), and the layer's output site is that rescaled float tensor
(`rescaled_output`). Such a graph runs one image at a time
(harden.graph.batching).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

# The integer types a QDQ graph stores its weights, biases and requantised activations in.
INTEGER_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.int32))
# Ops of a graph in QOperator format, whose layers compute on integer tensors end to end.
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                 "DynamicQuantizeLinear")
# The QOperator layers that are fault sites, with the inputs that may be stored parameters: a QLinearConv's
# weight and int32 bias, a QLinearMatMul's constant operand, a QGemm's B and C. Their output is stored too.
QOPERATOR_LAYERS = {"QLinearConv": (3, 8), "QLinearMatMul": (0, 3), "QGemm": (0, 3, 6)}
# A QLinearAdd of a stored constant is how quantize_static writes a MatMul's separate bias: the constant
# (input 0 or 3) is a parameter site of its own, rerun through the QLinearAdd.
QOPERATOR_BIAS_ADD = ("QLinearAdd", (0, 3))
# What quantize_dynamic writes: float activations quantised at run time, one scale per run
# (harden.graph.batching), read by integer layers whose stored int8 weights are fault sites (input 1; a
# MatMulInteger's constant left operand too). Their int32 output is rescaled to float by a Cast and a Mul.
DYNAMIC_LAYERS = {"ConvInteger": (1,), "MatMulInteger": (0, 1)}


@dataclass(frozen=True)
class Dequantized:
    """A stored integer tensor, decoded by one DequantizeLinear into the float tensor a layer reads:
    (q − zero_point) × scale, per tensor or along `axis`."""

    stored: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def decode(self, values: np.ndarray, shape: Sequence[int], elems: np.ndarray | None = None) -> np.ndarray:
        """Float values of stored integers: the whole tensor of `shape`, or elements `elems` of it.

        As ONNX Runtime computes it: the difference in integers, converted to
        float32, times the float32 scale of the element's channel.
        """
        q = np.asarray(values).astype(np.int64)
        if self.scale.size == 1:
            scale, zero = self.scale.reshape(()), self.zero_point.reshape(())
        elif elems is None:
            view = [1] * len(shape)
            view[self.axis] = -1
            scale, zero = self.scale.reshape(view), self.zero_point.reshape(view)
        else:
            channel = np.unravel_index(elems, tuple(shape))[self.axis]
            scale, zero = self.scale[channel], self.zero_point[channel]
        return (q - zero.astype(np.int64)).astype(np.float32) * scale.astype(np.float32)


def find_dequantized(nodes: Sequence[onnx.NodeProto], constants: Mapping[str, np.ndarray]) -> dict[str, Dequantized]:
    """Every DequantizeLinear of a stored integer constant with constant scale and zero point, by its output
    (per-tensor or per-axis; blocked quantisation is left alone)."""
    found: dict[str, Dequantized] = {}
    for node in nodes:
        if node.op_type != "DequantizeLinear" or not node.output or node.input[0] not in constants:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        stored = constants[node.input[0]]
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        zero = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), stored.dtype)
        if stored.dtype not in INTEGER_DTYPES or scale is None or zero is None or attrs.get("block_size", 0):
            continue
        axis = int(attrs.get("axis", 1))  # type: ignore[call-overload]
        axis = axis + stored.ndim if axis < 0 else axis
        if scale.size != 1 and (stored.ndim <= axis or scale.size != stored.shape[axis]):
            continue
        found[node.output[0]] = Dequantized(node.input[0], scale.reshape(-1), zero.reshape(-1), axis)
    return found


def rescaled_output(nodes: Sequence[onnx.NodeProto], consumers: Mapping[str, list[int]],
                    constants: Collection[str], tensor: str, outputs: set[str]) -> str | None:
    """The float tensor that a dynamically quantised layer's int32 output `tensor` becomes: through the Cast and
    the Mul by the scale product that quantize_dynamic writes after it, and the Add of its bias if it has one.
    That float tensor is what the next layer reads, and what ONNX Runtime stores when it fuses the chain
    (MatMulIntegerToFloat); None when the chain is not there."""
    out, chain = tensor, []
    for op in ("Cast", "Mul", "Add"):
        readers = consumers.get(out, [])
        if len(readers) != 1 or out in outputs or nodes[readers[0]].op_type != op:
            break
        node = nodes[readers[0]]
        if op == "Add" and not any(t in constants for t in node.input if t != out):
            break  # a skip connection, not the bias
        out = node.output[0]
        chain.append(op)
    return out if chain[:2] == ["Cast", "Mul"] else None


def requantised_output(nodes: Sequence[onnx.NodeProto], consumers: Mapping[str, list[int]],
                       constants: Mapping[str, np.ndarray], tensor: str, outputs: set[str]) -> str | None:
    """The QuantizeLinear output that is the only reader of a layer's float output `tensor`, if any: what
    an integer deployment stores in its place (per-tensor scale and zero point, as activations have)."""
    readers = consumers.get(tensor, [])
    if len(readers) != 1 or tensor in outputs:
        return None
    node = nodes[readers[0]]
    if node.op_type != "QuantizeLinear" or not node.output or any(
            t not in constants or constants[t].size != 1 for t in node.input[1:] if t):
        return None
    return node.output[0]
