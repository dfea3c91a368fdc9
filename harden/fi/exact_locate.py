"""Finding the final classifier of an ONNX graph for the exact analysis, and reading its constants.

The analysis needs the classifier as numbers (weights, bias, the text head's projection and embeddings) and
as names (the tensors the injector flips). This module walks back from the model output through shape-only
ops, one (Log)Softmax and harden's range clips to the layer that makes the scores, and refuses anything else
with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from harden.errors import HardenError
from harden.fi.exact_half import is_half
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_pooled import PooledConvHead
from harden.fi.exact_text import TextHead
from harden.fi.graphinfo import bypass_constant_views, named_copy

# Ops between the head and the model output that change neither values nor their order.
SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Dropout"})
# Normalisations of the scores that keep their order, except within rounding of a tie (exact_site.after_softmax).
SOFTMAX = frozenset({"Softmax", "LogSoftmax"})

Head = LinearHead | TextHead | PooledConvHead


class _Graph:
    """Producers and constant values of a model, by tensor name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        # a float16 graph (harden.fi.exact_half): its float16 constants are read as float32, exactly
        self.half = is_half(model)
        self.model = named_copy(model)
        bypass_constant_views(self.model)  # a weight behind an Identity or a Reshape is still a constant
        self.transposed: set[str] = set()  # weights stored as the transpose of the head's layout
        self.clips: dict[str, float] = {}  # tensors the graph range-clips, by their unclipped name
        self.producer = {o: n for n in self.model.graph.node for o in n.output if o}
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        for node in self.model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def node(self, tensor: str, ops: Sequence[str], what: str) -> onnx.NodeProto:
        node = self.producer.get(tensor)
        if node is None or node.op_type not in ops:
            found = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
            raise HardenError(f"exact analysis: {what} {tensor!r} comes from {found}, expected {'/'.join(ops)}")
        return node

    def const(self, tensor: str, what: str) -> np.ndarray:
        if tensor not in self.constants:
            if getattr(self.producer.get(tensor), "op_type", "") == "DequantizeLinear":
                raise HardenError(f"exact analysis: the {what} {tensor!r} is dequantised from stored integers, and "
                                  "ONNX Runtime does not fuse this layer into an integer kernel; the sampled "
                                  "campaign covers it")
            raise HardenError(f"exact analysis: the {what} {tensor!r} is not a constant of the model")
        value = self.constants[tensor]
        if self.half and value.dtype == np.float16:
            return value.astype(np.float32)
        if value.dtype != np.float32:
            raise HardenError(f"exact analysis: the {what} {tensor!r} is {value.dtype}, not float32")
        return value

    def uncast(self, tensor: str) -> str:
        """In a float16 graph, the tensor a Cast reads (the converter keeps Max in float32 between two Casts);
        `tensor` itself otherwise. harden.fi.exact_half runs the Casts as the graph has them."""
        node = self.producer.get(tensor)
        while self.half and node is not None and node.op_type == "Cast":
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor

    def unclip(self, tensor: str) -> str:
        """The tensor a range clip of `tensor` reads, recording its bound; `tensor` itself when not one.

        The clip is harden's own (harden.graph.range_clip): Clip(Where(IsNaN(x), 0, x), -p, p), which is
        clamp_to_range(x, p) exactly. A bare Clip keeps NaN, a different rule, and is not looked through.
        """
        clip = self.producer.get(tensor)
        if clip is None or clip.op_type != "Clip":
            return tensor
        where = self.producer.get(clip.input[0])
        if where is None or where.op_type != "Where" or len(where.input) != 3:
            return tensor
        isnan = self.producer.get(where.input[0])
        source = where.input[2]
        zero = self.constants.get(where.input[1])
        if isnan is None or isnan.op_type != "IsNaN" or isnan.input[0] != source or zero is None or zero.any():
            return tensor
        low, high = self._clip_bounds(clip)
        if not (high > 0 and low == -high):
            return tensor
        self.clips[source] = high
        return source

    def _clip_bounds(self, clip: onnx.NodeProto) -> tuple[float, float]:
        """(min, max) of a Clip: attributes before opset 11, constant inputs after (NaN where unknown)."""
        if len(clip.input) == 1:
            return _attr(clip, "min", np.nan), _attr(clip, "max", np.nan)
        bounds = [self.constants.get(t) if t else None for t in (*clip.input[1:3], "", "")[:2]]
        low, high = (float(b.reshape(-1)[0]) if b is not None and b.size == 1 else np.nan for b in bounds)
        return low, high

    def split(self, node: onnx.NodeProto) -> tuple[str, str]:
        """(variable input, constant input) of a binary node."""
        a, b = node.input[0], node.input[1]
        if b in self.constants:
            return a, b
        if a in self.constants:
            return b, a
        raise HardenError(f"exact analysis: {node.op_type} {node.name!r} has no constant operand")


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(onnx.helper.get_attribute_value(a))
    return default


def _gemm(g: _Graph, node: onnx.NodeProto, what: str) -> tuple[str, np.ndarray, str, np.ndarray | None, str | None]:
    """(input, weight as rows×d, weight name, bias, bias name) of a plain Gemm; records a transposed store."""
    if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
        raise HardenError(f"exact analysis: {what} Gemm {node.name!r} uses transA/alpha/beta; "
                          "a flipped stored weight would not be the flipped effective weight")
    weight = g.const(node.input[1], f"{what} weight")
    if not _attr(node, "transB", 0):
        weight = weight.T
        g.transposed.add(node.input[1])
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = g.const(bias_name, f"{what} bias") if bias_name else None
    if bias is not None and bias.size == weight.shape[0]:
        bias = bias.reshape(-1)
    elif bias is not None:
        raise HardenError(f"exact analysis: {what} bias {bias_name!r} has shape {bias.shape}; expected one per row")
    return node.input[0], np.ascontiguousarray(weight), node.input[1], bias, bias_name


def locate_head(model: onnx.ModelProto) -> Head:
    """The final classifier of `model` as a LinearHead, PooledConvHead or TextHead, or HardenError saying why not.

    A Softmax or LogSoftmax of the scores may follow (most model-zoo graphs end
    in one): the head then records it, and the analysis decides that output's top-1.
    Range clips that `harden rewrite --range-clip` put on a linear classifier's
    scores, or on the text head's projection and cosines, are recorded in
    `head.clips`, and every policy applies them. In a float16 graph, Casts are
    looked through (onnxconverter-common keeps Max in float32 between two, and
    keep_io_types casts the scores to float32) and float16 constants are read
    as float32, exactly.
    """
    g = _Graph(model)
    node = _past_shape_ops(g, g.uncast(g.model.graph.output[0].name))
    softmax = node if node is not None and node.op_type in SOFTMAX else None
    if softmax is not None:
        node = _past_shape_ops(g, softmax.input[0])
    if node is not None and node.op_type == "Clip":
        node = _past_shape_ops(g, g.unclip(node.output[0]))
    head = _head(g, node)
    if softmax is not None:
        _check_class_axis(g, softmax, spatial=_still_spatial(g, softmax.input[0]))
        head.softmax = softmax.op_type
    return head


def _past_shape_ops(g: _Graph, tensor: str) -> onnx.NodeProto | None:
    """The node that computes `tensor`, looking through ops that change only its shape (None: an input)."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type in SHAPE_ONLY:
        node = g.producer.get(node.input[0])
    return node


def _still_spatial(g: _Graph, tensor: str) -> bool:
    """Whether `tensor` is still N×C×1×1, as a Conv or a global pool writes it: no Flatten, Reshape or Squeeze
    between."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("Identity", "Dropout"):
        node = g.producer.get(node.input[0])
    return node is not None and node.op_type in ("Conv", "GlobalAveragePool")


def _check_class_axis(g: _Graph, softmax: onnx.NodeProto, spatial: bool) -> None:
    """Refuse a Softmax that does not normalise each image's scores over the classes.

    Axis 1 does, on N×C scores and (as opset < 13 flattens from the axis) on a
    1×1 Conv's N×C×1×1; axis -1 only on N×C.
    """
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    axis = int(_attr(softmax, "axis", -1 if opset >= 13 else 1))
    if axis != 1 and (axis != -1 or spatial):
        raise HardenError(f"exact analysis: Softmax {softmax.name!r} normalises axis {axis}, not the classes")


def _head(g: _Graph, node: onnx.NodeProto | None) -> Head:
    """The classifier that computes the scores (`node` produces them)."""
    if node is None:
        raise HardenError("exact analysis: the model output is not computed by the graph")
    if node.op_type in SOFTMAX:
        raise HardenError(f"exact analysis needs the class scores, or one (Log)Softmax of them, as the output; "
                          f"this model applies another {node.op_type} ({node.name!r}) after its classifier")
    if node.op_type == "Mul":
        return _text_head(g, node)
    if node.op_type == "Gemm":
        f, w, wname, b, bname = _gemm(g, node, "classifier")
        return _with_layout(LinearHead(w, b, f, node.output[0], wname, bname, node.name), g)
    if node.op_type == "Conv":
        return _with_layout(_pooled_conv(g, node), g)
    if node.op_type == "GlobalAveragePool":
        return _with_layout(_conv_on_map(g, node), g)
    if node.op_type in ("MatMul", "Add"):
        bias = bname = None
        if node.op_type == "Add":
            x, bname = g.split(node)
            bias = g.const(bname, "classifier bias").reshape(-1)
            mm = g.node(x, ["MatMul"], "classifier input")
        else:
            mm = node
        f, wname = g.split(mm)
        if wname != mm.input[1]:
            raise HardenError(f"exact analysis: MatMul {mm.name!r} computes W·x; expected features·W")
        w = g.const(wname, "classifier weight").T
        g.transposed.add(wname)
        return _with_layout(LinearHead(np.ascontiguousarray(w), bias, f, node.output[0], wname, bname, mm.name), g)
    raise HardenError(f"exact analysis: the class scores come from {node.op_type} {node.name!r}; "
                      "expected Gemm, MatMul(+Add), a 1×1 Conv before or after a global pool, or the text head")


def _pooled_conv(g: _Graph, node: onnx.NodeProto) -> LinearHead:
    """A 1×1 Conv reading a GlobalAveragePool's 1×1 map, as the model zoo's DenseNet-121 classifies: a Gemm in
    all but layout (its stored C×d×1×1 weight is the C×d matrix, element for element).

    A 1×1 Conv that scores a larger map before the pool (SqueezeNet) is `_conv_on_map`'s.
    """
    pool = g.producer.get(node.input[0])
    if pool is None or pool.op_type != "GlobalAveragePool":
        raise HardenError(f"exact analysis: the class scores come from Conv {node.name!r} on a feature map; "
                          "only a 1×1 Conv on a GlobalAveragePool output, or one pooled after it, is covered")
    matrix, bias, bias_name = _conv_1x1(g, node)
    return LinearHead(matrix, bias, node.input[0], node.output[0], node.input[1], bias_name, node.name)


def _conv_1x1(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(C×d weight matrix, bias, bias name) of an unpadded, ungrouped, unstrided 1×1 Conv; refuses others."""
    weight = g.const(node.input[1], "classifier weight")
    pads = next((list(a.ints) for a in node.attribute if a.name == "pads"), [])
    strides = next((list(a.ints) for a in node.attribute if a.name == "strides"), [])
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    if weight.ndim != 4 or weight.shape[2:] != (1, 1) or _attr(node, "group", 1) != 1 \
            or any(pads) or any(s != 1 for s in strides) or auto_pad not in ("NOTSET", "VALID"):
        raise HardenError(f"exact analysis: Conv {node.name!r} is not an unpadded, ungrouped, unstrided 1×1 "
                          "convolution")
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = g.const(bias_name, "classifier bias").reshape(-1) if bias_name else None
    return np.ascontiguousarray(weight.reshape(weight.shape[0], -1)), bias, bias_name


def _conv_on_map(g: _Graph, pool: onnx.NodeProto) -> PooledConvHead:
    """1×1 Conv [→ harden's range clip] [→ Relu] → GlobalAveragePool: the classifier scores every position of
    the map, and the pool averages them (SqueezeNet; `harden rewrite --range-clip` clips the Conv's output).
    The nodes after the Conv are kept, with the constants they read, so that the analysis reruns them as the
    graph has them. What they compute must feed nothing else, or a fault would reach the scores another way."""
    tail = [pool]
    tensor = pool.input[0]
    relu = getattr(g.producer.get(tensor), "op_type", "") == "Relu"
    if relu:
        tail.append(g.producer[tensor])
        tensor = tail[-1].input[0]
    source = g.unclip(tensor)
    if source != tensor:  # Clip(Where(IsNaN(x), 0, x)): exact_locate._Graph.unclip has checked the pattern
        clip = g.producer[tensor]
        where = g.producer[clip.input[0]]
        tail += [clip, where, g.producer[where.input[0]]]
    conv = g.producer.get(source)
    if conv is None or conv.op_type != "Conv":
        found = "a graph input" if conv is None else f"{conv.op_type} {conv.name!r}"
        raise HardenError(f"exact analysis: GlobalAveragePool {pool.name!r} pools {found}; only a 1×1 Conv "
                          "[→ range clip] [→ Relu] → GlobalAveragePool tail is covered")
    tail.reverse()
    inside = {o for n in [conv, *tail[:-1]] for o in n.output}
    members = {n.output[0] for n in [conv, *tail]}
    leaks = [n.name or n.op_type for n in g.model.graph.node
             if n.output[0] not in members and inside & set(n.input)]
    leaks += [o.name for o in g.model.graph.output if o.name in inside]
    if leaks:
        raise HardenError(f"exact analysis: the classifier's Conv → Relu → pool tail also feeds {leaks[0]!r}")
    matrix, bias, bias_name = _conv_1x1(g, conv)
    copies = []
    for node in [conv, *tail]:
        copies.append(onnx.NodeProto())
        copies[-1].CopyFrom(node)
    constants = {name: g.constants[name] for node in tail for name in node.input if name in g.constants}
    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    return PooledConvHead(matrix, bias, conv.input[0], conv.output[0], pool.output[0], conv.input[1], bias_name,
                          conv.name, relu, copies, constants, opset)


def _text_head(g: _Graph, mul: onnx.NodeProto) -> TextHead:
    """Mul(MatMul(Div(z, Max(ReduceL2(z), eps)), Wᵀ), scale) with z = Gemm(f, P, b)."""
    cos, scale_name = g.split(mul)
    scale = g.const(scale_name, "logit scale")
    if scale.size != 1 or not float(scale.reshape(-1)[0]) > 0:
        raise HardenError(f"exact analysis: the scale {scale_name!r} is not one positive number")
    cos = g.unclip(cos)
    mm = g.node(cos, ["MatMul"], "cosine")
    unit, wt = g.split(mm)
    div = g.node(unit, ["Div"], "normalised projection")
    z, norm = div.input[0], div.input[1]
    mx = g.node(g.uncast(norm), ["Max"], "norm")
    red, eps_name = g.split(mx)
    reduce = g.node(g.uncast(red), ["ReduceL2"], "norm")
    if reduce.input[0] != z:
        raise HardenError(f"exact analysis: {reduce.name!r} does not normalise {z!r}")
    z = g.unclip(z)
    proj = g.node(z, ["Gemm"], "projection")
    f, p, pname, b, bname = _gemm(g, proj, "projection")
    if b is None or bname is None:
        raise HardenError(f"exact analysis: the projection {proj.name!r} has no bias")
    g.transposed.add(wt)
    head = TextHead(p, b, np.ascontiguousarray(g.const(wt, "class embeddings").T), float(scale.reshape(-1)[0]),
                    float(g.const(eps_name, "eps").reshape(-1)[0]), f, z, cos, mul.output[0], pname, bname, wt,
                    proj.name, mm.name)
    head.unit = div.output[0]
    return _with_layout(head, g)


def _with_layout(head: Head, g: _Graph) -> Head:
    head.transposed = tuple(sorted(g.transposed))
    head.clips = dict(g.clips)
    return head
