"""An integer classifier inside a QOperator graph: where it is, what it stores, and its exact arithmetic.

A quantised deployment's classifier is an integer layer (QGemm, or QLinearMatMul):
its int32 accumulator is exact integer arithmetic,
acc[n, c] = Σ_f (x[n, f] − zx)·(W[c, f] − zw[c]) + b[c] (wrapping at 32 bits, as
the kernel adds), and its output is requantised once,
y = saturate(round_half_even(float32(acc) · M[c]) + zy) with M = sx·sw/sy in
float32. Between y and the scores there may be elementwise integer ops with
constant operands (the text head's QLinearMul by exp(s)), a softmax, and the
DequantizeLinear: the tail, which ONNX Runtime runs (`IntegerHead.run_tail`).
harden.fi.exact_integer enumerates the faults.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError
from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.graph.ort import make_session

SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
# Ops of the tail that act on each class's value alone: the text head's QLinearMul by exp(s), or in a graph
# that ONNX Runtime fused from QDQ, the float Mul between a DequantizeLinear and a QuantizeLinear. Every input
# but the one carrying the layer's output must be a constant.
ELEMENTWISE = frozenset({"QLinearMul", "QLinearAdd", "DequantizeLinear", "QuantizeLinear", "Mul", "Add", "Sub",
                         "Div", "Cast"})
# Ops of the tail that mix the classes of a row; the class axis must be the last.
ROWWISE = frozenset({"QLinearSoftmax", "Softmax", "LogSoftmax"})
# Each layer's (input, weight, bias) positions; a QLinearMatMul has no bias.
LAYERS = {"QGemm": (0, 3, 6), "QLinearMatMul": (0, 3, None)}


def _constant_producers(model: onnx.ModelProto) -> tuple[set[str], dict[str, onnx.NodeProto]]:
    """Every tensor computed from constants alone (initializers, Constant nodes and, say, the
    DequantizeLinear of a stored scale), and the node that makes each one that is not an initializer."""
    constant = {t.name for t in model.graph.initializer}
    made: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        if all(not t or t in constant for t in node.input):
            for t in node.output:
                if t:
                    constant.add(t)
                    made[t] = node
    return constant, made


def _tail_nodes(model: onnx.ModelProto) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The nodes from the classifier's output to the scores (scores first), and the node before them."""
    constant, _ = _constant_producers(model)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    tail: list[onnx.NodeProto] = []
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type not in LAYERS:
        if node.op_type not in SHAPE_ONLY | ELEMENTWISE | ROWWISE:
            raise HardenError(f"exact analysis: the scores come from {node.op_type} {node.name!r}; the analysis of "
                              f"an integer classifier covers {' and '.join(LAYERS)} followed by elementwise ops, "
                              "a softmax and shape-only ops")
        carried = [t for t in node.input if t and t not in constant]
        if len(carried) != 1:
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} after the classifier has no "
                              "constant operand")
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
        if node.op_type in ROWWISE and axis not in (-1, 1):
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} is not over the classes")
        tail.append(node)
        node = producer.get(carried[0])
    return node, tail


class IntegerHead:
    """An integer classifier's stored integers and quantisation parameters, and its exact arithmetic."""

    def __init__(self, model: onnx.ModelProto) -> None:
        model = named_copy(model)
        bypass_constant_views(model)
        self.model = model
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        node, tail = _tail_nodes(model)
        if node is None:
            raise HardenError("exact analysis: the scores come from a graph input; the analysis covers an "
                              f"integer classifier ({' or '.join(LAYERS)})")
        self.tail = tail[::-1]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        names = list(node.input) + [""] * (9 - len(node.input))
        at_x, at_w, at_b = LAYERS[node.op_type]
        bias = names[at_b] if at_b is not None else ""
        quant = [names[i] for i in (1, 2, 4, 5, 6, 7)] if at_b is None else [names[i] for i in (1, 2, 4, 5, 7, 8)]
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or any(  # type: ignore[arg-type]
                t and t not in constants for t in (*quant, names[at_w], bias)) or names[at_w] not in constants \
                or names[at_x] in constants or (at_b is not None and (not bias or not quant[4])):
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} needs a constant weight, bias and "
                              "quantisation parameters, alpha 1 and no transA")
        self.op, self.node, self.input, self.output = node.op_type, node.name, names[at_x], node.output[0]
        self.weight_name, self.bias_name = names[at_w], bias
        self.stored_weight = constants[names[at_w]]
        self.transposed = bool(attrs.get("transB", 0))
        weight = self.stored_weight.T if self.transposed else self.stored_weight  # F × C
        if weight.ndim != 2:
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} has a {weight.ndim}-D weight")
        self.classes = weight.shape[1]
        sx_name, zx_name, sw_name, zw_name, sy_name, zy_name = quant
        self.zx = int(constants[zx_name].reshape(-1)[0]) if zx_name else 0
        zw = constants[zw_name].astype(np.int64).reshape(-1) if zw_name else np.zeros(1, np.int64)
        self.wz = weight.astype(np.int64) - np.broadcast_to(zw, (self.classes,))[None, :]  # (W − zw), F × C
        self.bias = constants[bias] if bias else np.zeros(self.classes, np.int32)
        if self.bias.size != self.classes:
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} has a bias of {self.bias.size} "
                              f"values for {self.classes} classes")
        sx = np.float32(constants[sx_name].reshape(-1)[0])
        sw = constants[sw_name].astype(np.float32).reshape(-1)
        sy = np.float32(constants[sy_name].reshape(-1)[0])
        self.multiplier = np.broadcast_to((sx * sw) / sy, (self.classes,)).astype(np.float32)
        self.zy = int(constants[zy_name].reshape(-1)[0]) if zy_name else 0
        self.out_dtype = constants[zy_name].dtype if zy_name else np.dtype(np.uint8)
        self.levels = np.arange(np.iinfo(self.out_dtype).min, np.iinfo(self.out_dtype).max + 1)
        self.mixes = any(n.op_type in ROWWISE for n in self.tail)
        nodes = self.with_constant_producers(self.tail)
        inits = [onnx.numpy_helper.from_array(constants[t], t) for n in nodes for t in n.input if t in constants]
        scores_type = self.model.graph.output[0].type.tensor_type.elem_type
        graph = helper.make_graph(
            nodes, "tail", [helper.make_tensor_value_info(self.output, helper.np_dtype_to_tensor_dtype(
                self.out_dtype), ["rows", self.classes])],
            [helper.make_tensor_value_info(self.tail[-1].output[0], scores_type, None)],
            list({t.name: t for t in inits}.values()))
        tail_model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        tail_model.ir_version = self.model.ir_version
        self._tail = make_session(tail_model, opt_level="disable")
        # the scores of every stored value v of every class c: table[v − min, c] (elementwise tails only)
        grid = np.repeat(self.levels[:, None], self.classes, axis=1)
        self.table = None if self.mixes else self.run_tail(grid)

    def with_constant_producers(self, tail: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """The tail with the nodes that compute its constant operands (a DequantizeLinear of a stored scale),
        in graph order (computed from initializers alone, so the same for every image)."""
        _, made = _constant_producers(self.model)
        position = {id(n): i for i, n in enumerate(self.model.graph.node)}
        needed: dict[int, onnx.NodeProto] = {}
        pending = [t for n in tail for t in n.input]
        while pending:
            t = pending.pop()
            if t in made and id(made[t]) not in needed:
                needed[id(made[t])] = made[t]
                pending.extend(made[t].input)
        return sorted(needed.values(), key=lambda n: position[id(n)]) + tail

    def run_tail(self, y: np.ndarray) -> np.ndarray:
        """ONNX Runtime's scores of rows of stored outputs `y` (… × C), through the nodes after the layer."""
        rows = y.reshape(-1, self.classes).astype(self.out_dtype)
        (scores,) = self._tail.run(None, {self.output: rows})
        return np.asarray(scores, dtype=np.float32).reshape(y.shape)

    def scores(self, y: np.ndarray, classes: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The scores of stored outputs `y` (last axis: the classes `classes`) of an elementwise tail."""
        assert self.table is not None
        columns = np.arange(self.classes)[classes]
        return self.table[y - self.levels[0], np.broadcast_to(columns, y.shape)]

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        """The int32 accumulators (as int64 values) of inputs `x` (N × F stored integers)."""
        return wrap32((x.astype(np.int64) - self.zx) @ self.wz + self.bias.astype(np.int64))

    def requantise(self, acc: np.ndarray, classes: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The stored outputs of accumulators `acc` (last axis: the classes `classes`), as the kernel rounds."""
        info = np.iinfo(self.out_dtype)
        scaled = np.rint(acc.astype(np.float32) * self.multiplier[classes])
        return np.clip(scaled + self.zy, info.min, info.max).astype(np.int64)


def wrap32(values: np.ndarray) -> np.ndarray:
    """int64 values as an int32 register holds them after wrapping additions."""
    return ((values + 2**31) % 2**32) - 2**31
