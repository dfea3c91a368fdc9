"""An integer classifier (in a QOperator graph, or in the graph ONNX Runtime fuses from QDQ): where it is,
what it stores, and its exact arithmetic.

A quantised deployment's classifier is an integer layer (QGemm, QLinearMatMul, or
a 1×1 QLinearConv): its int32 accumulator is exact integer arithmetic,
acc[n, c, p] = Σ_f (x[n, f, p] − zx)·(W[c, f] − zw[c]) + b[c] (wrapping at 32
bits, as the kernel adds), and its output is requantised once,
y = saturate(round_half_even(float32(acc) · M[c]) + zy) with M = sx·sw/sy in
float32. p runs over the pixels of a 1×1 convolution's map; a Gemm has one.
Where the map has several pixels (SqueezeNet's classifier), a
QLinearGlobalAveragePool follows and makes one value per class from the sum of
its pixels' stored outputs (ONNX Runtime's kernel reads nothing else), through a
table that ONNX Runtime computes. Between that value and the scores there may be
elementwise ops with constant operands (the text head's QLinearMul by exp(s)), a
softmax, and the DequantizeLinear: the tail, which ONNX Runtime runs
(`IntegerHead.run_tail`). harden.fi.exact_integer enumerates the faults.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.fi.integer_kernel import Kernel
from harden.graph.ort import make_session

SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
# Ops of the tail that act on each class's value alone: the text head's QLinearMul by exp(s), or in a graph
# that ONNX Runtime fused from QDQ, the float Mul between a DequantizeLinear and a QuantizeLinear. Every input
# but the one carrying the layer's output must be a constant.
ELEMENTWISE = frozenset({"QLinearMul", "QLinearAdd", "DequantizeLinear", "QuantizeLinear", "Mul", "Add", "Sub",
                         "Div", "Cast"})
# Ops of the tail that mix the classes of a row; the class axis must be the last.
ROWWISE = frozenset({"QLinearSoftmax", "Softmax", "LogSoftmax"})
# The op that may pool a 1×1 convolution's map into one value per class, right after the layer.
POOL = "QLinearGlobalAveragePool"
# Each layer's input, weight and bias positions (a QLinearMatMul has no bias), and its quantisation
# parameters: sx, zx, sw, zw, sy, zy.
LAYERS = {"QGemm": (0, 3, 6, (1, 2, 4, 5, 7, 8)), "QLinearMatMul": (0, 3, None, (1, 2, 4, 5, 6, 7)),
          "QLinearConv": (0, 3, 8, (1, 2, 4, 5, 6, 7))}


def constant_producers(model: onnx.ModelProto) -> tuple[set[str], dict[str, onnx.NodeProto]]:
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
    constant, _ = constant_producers(model)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    tail: list[onnx.NodeProto] = []
    node = producer.get(model.graph.output[0].name)
    while node is not None and node.op_type not in LAYERS:
        if node.op_type not in SHAPE_ONLY | ELEMENTWISE | ROWWISE | {POOL}:
            raise HardenError(f"exact analysis: the scores come from {node.op_type} {node.name!r}; the analysis of "
                              f"an integer classifier covers {', '.join(LAYERS)} followed by elementwise ops, "
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


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


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
                              f"integer classifier ({', '.join(LAYERS)})")
        self.tail = tail[::-1]
        self.pool = self.tail.pop(0) if self.tail and self.tail[0].op_type == POOL else None
        if any(n.op_type == POOL for n in self.tail):
            raise HardenError(f"exact analysis: {POOL} pools the classes' values after {node.op_type} "
                              f"{node.name!r}, not its map")
        attrs = _attrs(node)
        names = list(node.input) + [""] * (9 - len(node.input))
        at_x, at_w, at_b, at_q = LAYERS[node.op_type]
        bias = names[at_b] if at_b is not None else ""
        quant = [names[i] for i in at_q]
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or any(  # type: ignore[arg-type]
                t and t not in constants for t in (*quant, names[at_w], bias)) or names[at_w] not in constants \
                or names[at_x] in constants or (node.op_type == "QGemm" and (not bias or not quant[4])):
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} needs a constant weight, bias and "
                              "quantisation parameters, alpha 1 and no transA")
        self.op, self.node, self.input, self.output = node.op_type, node.name, names[at_x], node.output[0]
        self.weight_name, self.bias_name = names[at_w], bias
        self.stored_weight = constants[names[at_w]]
        if node.op_type == "QLinearConv":
            self._check_pointwise(node, attrs)
            self.transposed = True  # stored C × F × 1 × 1
            weight = self.stored_weight.reshape(self.stored_weight.shape[0], -1).T
        else:
            self.transposed = bool(attrs.get("transB", 0))
            weight = self.stored_weight.T if self.transposed else self.stored_weight
        if weight.ndim != 2:
            raise HardenError(f"exact analysis: {node.op_type} {node.name!r} has a {weight.ndim}-D weight")
        self.weight_fc = weight  # the stored integers, features × classes
        self.classes = weight.shape[1]
        sx_name, zx_name, sw_name, zw_name, sy_name, zy_name = quant
        self.zx = int(constants[zx_name].reshape(-1)[0]) if zx_name else 0
        self.in_dtype = constants[zx_name].dtype if zx_name else np.dtype(np.uint8)  # the stored input's type
        self.kernel = Kernel.of(node.op_type, self.in_dtype, weight.dtype)  # exact, or saturating pairs (AVX2)
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
        self.out_levels = np.arange(np.iinfo(self.out_dtype).min, np.iinfo(self.out_dtype).max + 1)
        self.pooled = self.pool.output[0] if self.pool is not None else self.output  # what the tail reads
        pool_zero = self.pool.input[4] if self.pool is not None and len(self.pool.input) > 4 else ""
        self.tail_dtype = (constants[pool_zero].dtype if pool_zero else np.dtype(np.uint8)) if self.pool \
            else self.out_dtype
        self.levels = np.arange(np.iinfo(self.tail_dtype).min, np.iinfo(self.tail_dtype).max + 1)
        self._pool_tables: dict[int, np.ndarray] = {}
        self.mixes = any(n.op_type in ROWWISE for n in self.tail)
        self._tail = self._session(self.tail, self.pooled, self.tail_dtype,
                                   self.model.graph.output[0].type.tensor_type.elem_type) if self.tail else None
        # the scores of every stored value v of every class c: table[v − min, c] (elementwise tails only)
        grid = np.repeat(self.levels[:, None], self.classes, axis=1)
        self.table = None if self.mixes else self.run_tail(grid)

    @staticmethod
    def _check_pointwise(node: onnx.NodeProto, attrs: dict[str, object]) -> None:
        """A QLinearConv classifier must be a matrix applied at every pixel: 1×1, ungrouped, unpadded, stride 1."""
        kernel, pads, strides = (list(attrs.get(k, d)) for k, d in (  # type: ignore[call-overload]
            ("kernel_shape", [1, 1]), ("pads", []), ("strides", [])))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if kernel != [1, 1] or attrs.get("group", 1) != 1 or any(pads) or any(s != 1 for s in strides) \
                or auto_pad not in ("NOTSET", "VALID"):
            raise HardenError(f"exact analysis: QLinearConv {node.name!r} is not an unpadded, ungrouped 1×1 "
                              "convolution of stride 1")

    def _session(self, nodes: list[onnx.NodeProto], source: str, dtype: np.dtype,
                 out_type: int) -> ort.InferenceSession:
        """ONNX Runtime running `nodes` of the graph alone (with their constant operands), fed `source`."""
        return part_session(self.model, self.with_constant_producers(nodes),
                            {source: helper.np_dtype_to_tensor_dtype(dtype)}, (nodes[-1].output[0], out_type))

    def with_constant_producers(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """`nodes` with the nodes that compute their constant operands (a DequantizeLinear of a stored scale),
        in graph order (computed from initializers alone, so the same for every image)."""
        _, made = constant_producers(self.model)
        position = {id(n): i for i, n in enumerate(self.model.graph.node)}
        needed: dict[int, onnx.NodeProto] = {}
        present = {id(n) for n in nodes}
        pending = [t for n in nodes for t in n.input]
        while pending:
            t = pending.pop()
            if t in made and id(made[t]) not in needed and id(made[t]) not in present:
                needed[id(made[t])] = made[t]
                pending.extend(made[t].input)
        return sorted(needed.values(), key=lambda n: position[id(n)]) + nodes

    def run_tail(self, u: np.ndarray) -> np.ndarray:
        """ONNX Runtime's scores of rows of the values the tail reads `u` (… × C)."""
        rows = u.reshape(-1, self.classes).astype(self.tail_dtype)
        if self._tail is None:
            return rows.astype(np.float32).reshape(u.shape)
        (scores,) = self._tail.run(None, {self.pooled: rows})
        return np.asarray(scores, dtype=np.float32).reshape(u.shape)

    def scores(self, u: np.ndarray, classes: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The scores of values `u` the tail reads (last axis: the classes `classes`), with an elementwise tail."""
        assert self.table is not None
        columns = np.arange(self.classes)[classes]
        return self.table[u - self.levels[0], np.broadcast_to(columns, u.shape)]

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        """The int32 accumulators (as int64 values, N × C × P) of inputs `x` (N × F × P stored integers), as this
        CPU's kernel sums them (harden.fi.integer_kernel)."""
        xz = x.astype(np.int64) - self.zx
        acc = np.einsum("nfp,fc->ncp", xz, self.wz) if x.shape[2] > 1 else (xz[:, :, 0] @ self.wz)[:, :, None]
        acc += self.kernel.correction(x, self.weight_fc)
        return wrap32(acc + self.bias.astype(np.int64)[None, :, None])

    def requantise(self, acc: np.ndarray, classes: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The stored outputs of accumulators `acc` (… × c × P, c the classes `classes`), as the kernel rounds."""
        info = np.iinfo(self.out_dtype)
        scaled = np.rint(acc.astype(np.float32) * self.multiplier[classes][:, None])
        return np.clip(scaled + self.zy, info.min, info.max).astype(np.int32)

    def pool_sums(self, sums: np.ndarray, pixels: int) -> np.ndarray:
        """What the tail reads for each class whose P = `pixels` stored outputs sum to `sums`: the sum itself
        for a single pixel, or the pool's output, from a table of every possible sum."""
        if self.pool is None:
            return sums
        return self.pool_table(pixels)[sums - pixels * int(self.out_levels[0])]

    def reduce(self, acc: np.ndarray, classes: np.ndarray | slice = slice(None)) -> np.ndarray:
        """What the tail reads for accumulators `acc` (… × c × P): requantised, then pooled."""
        return self.pool_sums(self.requantise(acc, classes).sum(axis=-1), acc.shape[-1])

    def pool_table(self, pixels: int) -> np.ndarray:
        """ONNX Runtime's pooled output for every sum of `pixels` stored outputs, made once per map size: one
        row per sum, its values spread as evenly as the sum allows."""
        if pixels not in self._pool_tables:
            assert self.pool is not None
            lo, hi = int(self.out_levels[0]), int(self.out_levels[-1])
            total = np.arange(pixels * (hi - lo) + 1)
            q, r = np.divmod(total, pixels)
            rows = lo + q[:, None] + (np.arange(pixels)[None, :] < r[:, None])
            session = self._session([self.pool], self.output, self.out_dtype,
                                    helper.np_dtype_to_tensor_dtype(self.tail_dtype))
            (pooled,) = session.run(None, {self.output: rows.astype(self.out_dtype)[:, None, :, None]})
            self._pool_tables[pixels] = np.asarray(pooled).reshape(-1).astype(np.int64)
        return self._pool_tables[pixels]


def part_session(model: onnx.ModelProto, nodes: list[onnx.NodeProto], fed: dict[str, int],
                 output: tuple[str, int]) -> ort.InferenceSession:
    """ONNX Runtime running `nodes` of the model alone: the tensors `fed` (name: ONNX type) given per run,
    every other initializer they read stored, and `output` (name, ONNX type) returned."""
    stored = {t.name: t for t in model.graph.initializer}
    inits = {t: stored[t] for n in nodes for t in n.input if t in stored and t not in fed}
    graph = helper.make_graph(nodes, "part", [helper.make_tensor_value_info(t, kind, None) for t, kind in fed.items()],
                              [helper.make_tensor_value_info(*output, None)], list(inits.values()))
    part = helper.make_model(graph, opset_imports=list(model.opset_import))
    part.ir_version = model.ir_version
    return make_session(part, opt_level="disable")


def integer_classifier(model: onnx.ModelProto) -> IntegerHead | None:
    """The model's integer classifier, or None where its scores come from another kind of layer (a float
    classifier left out of quantisation, which the float32 analysis takes)."""
    try:
        node, _ = _tail_nodes(model)
    except HardenError:
        return None
    return IntegerHead(model) if node is not None and node.op_type in LAYERS else None


def flip_all(values: np.ndarray, bit: int) -> np.ndarray:
    """Every element of stored integers with `bit` flipped, as int64."""
    flat = values.reshape(-1)
    return flip(flat, np.full(flat.size, bit), flat.dtype.name).astype(np.int64).reshape(values.shape)


def accumulator_type(acc: np.ndarray, reach: int) -> type:
    """int32 where no fault's move (at most `reach`) can take an accumulator past int32, so nothing wraps and
    each array is half the size; int64, wrapped after every addition, otherwise."""
    return np.int32 if int(np.abs(acc).max(initial=0)) + reach < 2**31 else np.int64


def wrap32(values: np.ndarray) -> np.ndarray:
    """int64 values as an int32 register holds them after wrapping additions (numpy's narrowing cast keeps
    the low 32 bits)."""
    return values.astype(np.int32).astype(np.int64)
