"""A dynamically quantised classifier (quantize_dynamic's MatMulInteger, or a 1×1 ConvInteger on a pooled 1×1
map): where it is in the graph, what it stores, and its arithmetic after the integer accumulator.

The classifier reads float features f[n] (C of them), which a DynamicQuantizeLinear
quantises at run time from that image's own range: xq = saturate(round(f / sx) + zx).
Its MatMulInteger accumulates exactly in int32,
acc[n, k] = Σ_c (xq[n, c] − zx[n])·(W[c, k] − zw[k]), and a Cast, a Mul by
m[n, k] = fl(sx[n]·sw[k]) and the bias Add make the layer's output,
y[n, k] = fl(fl(float32(acc[n, k])·m[n, k]) + b[k]). Elementwise ops with constants may
follow (the text head's Mul by exp(s), a positive constant), then a (Log)Softmax over the
classes. Each step after the accumulator is one float32 operation, monotone in the
accumulator, which numpy performs as ONNX Runtime does (harden.fi.exact_dynamic checks
that on every analysed image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.fi.integer_head import SHAPE_ONLY, constant_producers
from harden.fi.integer_kernel import Kernel

# What may follow the scores, over the classes.
ROWWISE = ("Softmax", "LogSoftmax")


@dataclass
class DynamicHead:
    """A MatMulInteger (or 1×1 ConvInteger) classifier and what it stores, read from the graph (see the module
    docstring)."""

    model: onnx.ModelProto
    node: str
    op: str  # MatMulInteger, or a 1×1 ConvInteger on a 1×1 map
    features: str  # f, the DynamicQuantizeLinear's input
    quantised: str  # xq
    scale: str  # sx
    zero: str  # zx
    multiplier: str  # m = sx·sw
    accumulator: str  # acc
    output: str  # the rescaled accumulator plus the bias: the layer's output, as the injector names it
    scores: str
    weight_name: str
    weight: np.ndarray  # C × K, as stored
    weight_zero: np.ndarray  # () or (K,)
    bias_name: str
    bias: np.ndarray | None  # (K,) float32
    # elementwise ops after the layer, each with a constant: Add, or Mul by positive values (the text head's
    # exp(s)); both keep every score monotone in its accumulator
    tail: tuple[tuple[str, np.ndarray], ...] = ()
    # the nodes from `scores` to the model's output: a (Log)Softmax over the classes and shape-only ops, or none
    post: tuple[onnx.NodeProto, ...] = ()

    @property
    def classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def kernel(self) -> Kernel:
        """How ONNX Runtime sums the layer's uint8 × stored products on this CPU (harden.fi.integer_kernel)."""
        return Kernel.of(self.op, np.dtype(np.uint8), self.weight.dtype)

    def centred(self) -> np.ndarray:
        """W − zw in int64: what each unit of (xq − zx) adds to the accumulators."""
        return self.weight.astype(np.int64) - self.weight_zero.astype(np.int64).reshape(1, -1)

    def layer_output(self, acc: np.ndarray, m: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """The layer's output for accumulators `acc` (…×K) under multipliers `m` (broadcast): float32 as the graph
        computes it, with `bias` in place of the stored one if given."""
        bias = self.bias if bias is None else bias
        with np.errstate(all="ignore"):
            y = acc.astype(np.float32) * m.astype(np.float32)
            return y if bias is None else y + bias

    def after(self, y: np.ndarray) -> np.ndarray:
        """The scores of layer outputs `y`, through the tail's ops in float32."""
        with np.errstate(all="ignore"):
            for op, constant in self.tail:
                y = y * constant if op == "Mul" else y + constant
        return y

    def logits(self, acc: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The scores of accumulators `acc` (…×K) under multipliers `m` (broadcast), in float32 as the graph."""
        return self.after(self.layer_output(acc, m))


def dynamic_classifier(model: onnx.ModelProto) -> DynamicHead | None:
    """The dynamically quantised classifier that makes the model's scores, or None if there is none."""
    g = named_copy(model)
    bypass_constant_views(g)
    constant, _ = constant_producers(g)
    values = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    producer = {o: n for n in g.graph.node for o in n.output if o}
    readers: dict[str, int] = {}
    for n in g.graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    scores = g.graph.output[0].name
    node = producer.get(scores)
    post: list[onnx.NodeProto] = []
    while node is not None and readers.get(node.input[0]) == 1 and (
            node.op_type in SHAPE_ONLY or (node.op_type in ROWWISE and not any(n.op_type in ROWWISE for n in post))):
        post.insert(0, node)
        scores = node.input[0]  # the classifier's own output: the one the injector's site names
        node = producer.get(scores)
    if any(n.op_type in ROWWISE and _axis(n) not in (1, -1) for n in post):
        return None
    if not any(n.op_type in ROWWISE for n in post):
        post = []  # shape-only ops alone change no score
    tail: list[tuple[str, str, np.ndarray, str]] = []  # (op, constant, its value, output), walking back
    while node is not None and node.op_type in ("Add", "Mul") and not any(
            t in producer and producer[t].op_type == "Cast" for t in node.input):
        other = [t for t in node.input if t in values]
        moved = [t for t in node.input if t not in values]
        if len(other) != 1 or len(moved) != 1 or readers.get(moved[0]) != 1:
            return None
        c = values[other[0]]
        if c.dtype != np.float32 or (node.op_type == "Mul" and not (np.all(c > 0) and np.all(np.isfinite(c)))):
            return None
        tail.append((node.op_type, other[0], c.reshape(-1), node.output[0]))
        node = producer.get(moved[0])
    tail.reverse()
    if node is None or node.op_type != "Mul":
        return None
    cast = next((producer.get(t) for t in node.input if producer.get(t) is not None
                 and producer[t].op_type == "Cast"), None)
    to_float = any(a.name == "to" and a.i == TensorProto.FLOAT for a in cast.attribute) if cast else False
    if cast is None or not to_float or readers.get(cast.output[0]) != 1:
        return None
    multiplier = next(t for t in node.input if t != cast.output[0])
    mm = producer.get(cast.input[0])
    if mm is None or mm.op_type not in ("MatMulInteger", "ConvInteger") or len(mm.input) < 3 or \
            readers.get(mm.output[0]) != 1:
        return None
    dql = producer.get(mm.input[0])
    if (dql is None or dql.op_type != "DynamicQuantizeLinear" or mm.input[2] != dql.output[2]
            or mm.input[1] not in values):
        return None
    weight = _as_matrix(mm, values[mm.input[1]])
    if weight is None:
        return None
    zw = values.get(mm.input[3]) if len(mm.input) > 3 and mm.input[3] else np.zeros((), weight.dtype)
    scaled = producer.get(multiplier)
    if zw is None or scaled is None or scaled.op_type != "Mul" or dql.output[1] not in scaled.input or \
            not all(t in constant for t in scaled.input if t != dql.output[1]):
        return None
    classes = weight.shape[1]
    if any(c.size not in (1, classes) for _, _, c, _ in tail):
        return None
    output, bias_name, bias = node.output[0], "", None
    if tail and tail[0][0] == "Add" and tail[0][2].size == classes:  # the layer's own bias (harden.fi.sites)
        _, bias_name, bias, output = tail.pop(0)
    return DynamicHead(g, mm.name, mm.op_type, dql.input[0], dql.output[0], dql.output[1], dql.output[2], multiplier,
                       mm.output[0], output, scores, mm.input[1], weight,
                       zw.reshape(-1) if zw.size > 1 else zw.reshape(()), bias_name, bias,
                       tuple((op, c) for op, _, c, _ in tail), tuple(post))


def _axis(node: onnx.NodeProto) -> int:
    """A (Log)Softmax's axis (1 by default before opset 13, and over a 2-D or N × K × 1 × 1 input either
    default is the class axis)."""
    return int(next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1))


def _as_matrix(layer: onnx.NodeProto, stored: np.ndarray) -> np.ndarray | None:
    """The stored weight as the C × K matrix the layer applies: a MatMulInteger's B, or a 1×1 ConvInteger's
    K × C × 1 × 1 kernel transposed (a classifier on a pooled 1×1 map, as DenseNet's); None for any other."""
    if layer.op_type == "MatMulInteger":
        return stored if stored.ndim == 2 else None
    attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
    plain = (attrs.get("group", 1) == 1 and not any(attrs.get("pads", [])) and
             all(v == 1 for key in ("strides", "dilations") for v in attrs.get(key, [])))
    if stored.ndim != 4 or stored.shape[2:] != (1, 1) or not plain:
        return None
    return stored.reshape(stored.shape[:2]).T
