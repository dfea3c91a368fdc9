"""The exact final-layer analysis of an integer classifier: a QOperator graph's QGemm or QLinearMatMul head.

A quantised deployment's classifier is an integer layer: its int32 accumulator
is exact integer arithmetic, acc[n, c] = Σ_f (x[n, f] − zx)·(W[c, f] − zw[c]) + b[c]
(wrapping at 32 bits, as the kernel adds), and its output is requantised once,
y = saturate(round_half_even(float32(acc) · M[c]) + zy) with M = sx·sw/sy in
float32. A single flipped bit changes acc by an exact integer: (x − zx)·Δw in
one class for a weight, Δb for a bias, Δx·(W[:, f] − zw) across the classes for
an input, and the output y itself for an output fault. So every fault × image is
decided by integer arithmetic and one requantisation, with no rounding bound to
allow for. The requantisation is checked against ONNX Runtime's own output on
every analysed image before anything is counted; where it differs in a single
value the analysis is refused rather than approximated.

Between y and the scores there may be elementwise integer ops with constant
operands (the text head's QLinearMul by exp(s)) and the final
DequantizeLinear. y has only 2^8 values, so that tail is a table per class,
which ONNX Runtime itself computes once: scores = table[y, c]. Shape-only ops
may follow. A softmax in the tail (QLinearSoftmax, as the zoo's int8 graphs
end, or Softmax after the DequantizeLinear) mixes the classes: then ONNX
Runtime runs the tail on every row a single-class fault can make, image ×
class × stored value, once, and on every row an input fault makes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact import ExactResult, ExactSiteResult
from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.graph.ort import expose, make_session
from harden.graph.parallel import run_model

SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
# Elementwise integer ops the tail may hold, with the input that carries the layer's output (the other
# operand must be a constant).
ELEMENTWISE = {"QLinearMul": (0, 3), "QLinearAdd": (0, 3)}
# Ops of the tail that mix the classes of a row; the class axis must be the last.
ROWWISE = frozenset({"QLinearSoftmax", "Softmax", "LogSoftmax"})
# Each layer's (input, weight, bias) positions; a QLinearMatMul has no bias.
LAYERS = {"QGemm": (0, 3, 6), "QLinearMatMul": (0, 3, None)}
# integers worked on at once per chunk (int64): a few tens of MB
CHUNK = 1 << 22
# scores a softmax tail may run through ONNX Runtime for the single-class table (images × classes × 2^8 rows
# of C): 78 images of a 1000-class head
ROW_BUDGET = 2 * 10**10


class IntegerHead:
    """An integer classifier's stored integers and quantisation parameters, and its exact arithmetic."""

    def __init__(self, model: onnx.ModelProto) -> None:
        model = named_copy(model)
        bypass_constant_views(model)
        self.model = model
        producer = {o: n for n in model.graph.node for o in n.output if o}
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        tail: list[onnx.NodeProto] = []
        node = producer.get(model.graph.output[0].name)
        while node is not None and node.op_type in SHAPE_ONLY:
            node = producer.get(node.input[0])
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            tail.append(node)
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            found = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
            raise HardenError(f"exact analysis: the integer classifier's scores come from {found}; the analysis "
                              "covers an integer layer whose output is dequantised into the scores")
        tail.append(node)
        node = producer.get(node.input[0])
        while node is not None and (node.op_type in ELEMENTWISE or node.op_type == "QLinearSoftmax"):
            carried = [node.input[j] for j in ELEMENTWISE.get(node.op_type, (0,)) if node.input[j] not in constants]
            if len(carried) != 1:
                raise HardenError(f"exact analysis: {node.op_type} {node.name!r} after the classifier has no "
                                  "constant operand")
            tail.append(node)
            node = producer.get(carried[0])
        for op in tail:
            axis = next((helper.get_attribute_value(a) for a in op.attribute if a.name == "axis"), -1)
            if op.op_type in ROWWISE and axis not in (-1, 1):
                raise HardenError(f"exact analysis: {op.op_type} {op.name!r} is not over the classes")
        if node is None or node.op_type not in LAYERS:
            found = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
            raise HardenError(f"exact analysis: the dequantised scores come from {found}; the analysis of an "
                              f"integer classifier covers {' and '.join(LAYERS)}")
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
        inits = [onnx.numpy_helper.from_array(constants[t], t) for n in self.tail for t in n.input if t in constants]
        graph = helper.make_graph(
            self.tail, "tail", [helper.make_tensor_value_info(self.output, helper.np_dtype_to_tensor_dtype(
                self.out_dtype), ["rows", self.classes])],
            [helper.make_tensor_value_info(self.tail[-1].output[0], onnx.TensorProto.FLOAT, None)],
            list({t.name: t for t in inits}.values()))
        tail_model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        tail_model.ir_version = self.model.ir_version
        self._tail = make_session(tail_model, opt_level="disable")
        # the scores of every stored value v of every class c: table[v − min, c] (elementwise tails only)
        grid = np.repeat(self.levels[:, None], self.classes, axis=1)
        self.table = None if self.mixes else self.run_tail(grid)

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


def _stays(rivals_before: np.ndarray, rivals_after: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Whether the top-1 class keeps first place with score `value`: argmax takes the first of equal scores,
    so a rival before it must stay below, one after it may tie."""
    return (rivals_before < value) & (rivals_after <= value)


def _wins(top_value: np.ndarray, value: np.ndarray, before_top: np.ndarray) -> np.ndarray:
    """Whether another class with score `value` takes first place from the top-1 class's `top_value`."""
    return (value > top_value) | ((value == top_value) & before_top)


class _Judge(Protocol):
    """Decides faults from the stored outputs they make. `monotone`: a class's chance to stay first (or to
    stay behind) only grows (or shrinks) with its output, which the weight site's intervals need."""

    top1: np.ndarray
    monotone: bool

    def sdc(self, rows: np.ndarray, classes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """SDC of each fault that sets class classes[i]'s output of image rows[i] to values[i]."""

    def winners(self, y: np.ndarray) -> np.ndarray:
        """The top-1 class of each row of stored outputs (last axis: the classes)."""


class _TableJudge:
    """An elementwise tail: every other class keeps its score, so a fault is two comparisons."""

    def __init__(self, head: IntegerHead, scores: np.ndarray, top1: np.ndarray) -> None:
        n, classes = scores.shape
        self.head, self.top1, self.top = head, top1, scores[np.arange(n), top1]
        masked = np.where(np.arange(classes)[None, :] < top1[:, None], scores, -np.inf)
        self.before = masked.max(axis=1)  # the best rival before the top-1 class (or −inf)
        masked = np.where(np.arange(classes)[None, :] > top1[:, None], scores, -np.inf)
        self.after = masked.max(axis=1)
        assert head.table is not None
        self.monotone = bool(np.all(np.diff(head.table, axis=0) >= 0))

    def sdc(self, rows: np.ndarray, classes: np.ndarray, values: np.ndarray) -> np.ndarray:
        assert self.head.table is not None
        value = self.head.table[values - self.head.levels[0], classes]
        t = self.top1[rows]
        kept = np.where(classes == t, _stays(self.before[rows], self.after[rows], value),
                        ~_wins(self.top[rows], value, classes < t))
        return ~kept

    def winners(self, y: np.ndarray) -> np.ndarray:
        return np.argmax(self.head.scores(y), axis=-1)


class _RowJudge:
    """A tail that mixes the classes (a softmax): the top-1 of every row a single-class fault can make
    (image × class × stored value), from ONNX Runtime once; whole rows run through it as they come."""

    def __init__(self, head: IntegerHead, y: np.ndarray, top1: np.ndarray) -> None:
        n, classes = y.shape
        levels = head.levels
        if n * classes * len(levels) * classes > ROW_BUDGET:
            most = max(1, ROW_BUDGET // (classes * len(levels) * classes))
            raise HardenError(f"exact analysis: the softmax after the {classes}-class integer classifier needs "
                              f"{n * classes * len(levels):,} rows run through ONNX Runtime for {n} images; it "
                              f"allows {most} images (certify with a smaller --limit)")
        self.head, self.top1 = head, top1
        self.outcome = np.empty((n, classes, len(levels)), np.int16 if classes < 2**15 else np.int32)
        pairs = n * classes
        per = max(1, CHUNK // (len(levels) * classes))
        for p0 in range(0, pairs, per):
            ps = np.arange(p0, min(pairs, p0 + per))
            ns, cs = ps // classes, ps % classes
            rows = np.repeat(y[ns][:, None, :], len(levels), axis=1)  # pairs × levels × C
            rows[np.arange(len(ps))[:, None], np.arange(len(levels))[None, :], cs[:, None]] = levels[None, :]
            self.outcome[ns, cs] = np.argmax(head.run_tail(rows), axis=-1)
        keep = (self.outcome == top1[:, None, None]).astype(np.int8)
        step = np.diff(keep, axis=-1)
        own = np.arange(classes)[None, :, None] == top1[:, None, None]
        self.monotone = bool(np.all(np.where(own, step >= 0, step <= 0)))

    def sdc(self, rows: np.ndarray, classes: np.ndarray, values: np.ndarray) -> np.ndarray:
        return self.outcome[rows, classes, values - self.head.levels[0]] != self.top1[rows]

    def winners(self, y: np.ndarray) -> np.ndarray:
        return np.argmax(self.head.run_tail(y), axis=-1)


class Golden(NamedTuple):
    """The fault-free state the faults are judged against: the layer's stored input, its accumulators, the
    images' top-1 classes, and the judge of faults."""

    x: np.ndarray
    acc: np.ndarray
    y: np.ndarray
    top1: np.ndarray
    judge: _Judge


def golden_state(head: IntegerHead, inputs: np.ndarray, batch: int = 64,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> Golden:
    """ONNX Runtime's fault-free run, and numpy's integer arithmetic checked against it bit for bit."""
    scores_name = head.model.graph.output[0].name
    names = [scores_name, head.input, head.output]
    scores, x, y_ort = run_model(expose(head.model, names[1:]), inputs, names, "disable", batch, threads, providers)
    n = len(inputs)
    x, y_ort = x.reshape(n, -1), y_ort.reshape(n, -1).astype(np.int64)
    acc = head.accumulate(x)
    y = head.requantise(acc)
    if not np.array_equal(y, y_ort):
        raise HardenError(f"exact analysis: numpy's requantisation of {head.op} {head.node!r} differs from ONNX "
                          f"Runtime's in {int((y != y_ort).sum())} of {y.size} values; nothing can be judged "
                          "exactly (the sampled campaign covers this model)")
    mine = head.run_tail(y) if head.mixes else head.scores(y)
    if not np.array_equal(mine.view(np.uint32), scores.reshape(n, -1).astype(np.float32).view(np.uint32)):
        raise HardenError(f"exact analysis: the nodes after {head.op} {head.node!r}, run on its outputs alone, "
                          "do not give the model's scores")
    top1 = np.argmax(mine, axis=1)
    return Golden(x, acc, y, top1, _RowJudge(head, y, top1) if head.mixes else _TableJudge(head, mine, top1))


def analyse_integer_head(model: onnx.ModelProto, inputs: np.ndarray, batch: int = 64,
                         providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> ExactResult:
    """Exact SDC counts of every single-bit fault in an integer classifier's weight, bias, input and output,
    over the model-ready `inputs`, each flipped in the integer type it is stored in."""
    started = time.perf_counter()
    head = IntegerHead(model)
    g = golden_state(head, inputs, batch, providers, threads)
    sites = [_weight(head, g.x, g.acc, g.judge), *([_bias(head, g.acc, g.judge)] if head.bias_name else []),
             _input(head, g.x, g.acc, g.judge), _output(head, g.y, g.judge)]
    ops = [head.op, *(n.op_type for n in head.tail if n.op_type != "DequantizeLinear")]
    kind = f"integer linear ({' + '.join(ops)})"
    return ExactResult(head=kind, policy="none", fmt="stored integers", images=len(inputs), sites=sites,
                       seconds=time.perf_counter() - started)


def _site(head: IntegerHead, tensor: str, role: str, stored: np.ndarray, images: int) -> ExactSiteResult:
    width = 8 * stored.dtype.itemsize
    return ExactSiteResult(tensor=tensor, role=role, layer=head.node, elements=int(stored.size), images=images,
                           fmt=stored.dtype.name, faults=[0] * width, sdc=[0] * width, due=[0] * width,
                           hit_faults=[0] * width, hit_sdc=[0] * width)


def _flip_all(values: np.ndarray, bit: int) -> np.ndarray:
    """Every element of stored integers with `bit` flipped, as int64."""
    flat = values.reshape(-1)
    return flip(flat, np.full(flat.size, bit), flat.dtype.name).astype(np.int64).reshape(values.shape)


def _weight(head: IntegerHead, x: np.ndarray, acc: np.ndarray, judge: _Judge, bisect: bool = True) -> ExactSiteResult:
    """W[c, f] flipped: class c's accumulator moves by (x[n, f] − zx)·Δw on every image.

    Where no such move can wrap the int32 accumulator and the judge is monotone, each
    image and class has an interval of moves that keep its top-1 (`_keep_interval`), and a fault costs a
    multiplication and two comparisons; otherwise every faulty accumulator is requantised.
    """
    n = len(x)
    site = _site(head, head.weight_name, "weight", head.stored_weight, n)
    xz = x.astype(np.int64) - head.zx  # N × F
    features = xz.shape[1]
    stored = head.stored_weight.T if head.transposed else head.stored_weight  # F × C
    reach = int(np.abs(xz).max(initial=0)) * 2 ** (8 * stored.dtype.itemsize - 1)
    interval = None
    if bisect and int(np.abs(acc).max(initial=0)) + reach < 2**31 and judge.monotone:
        interval = _keep_interval(head, acc, judge)
        # every move fits in int32 here, which halves the memory each comparison streams through
        interval = tuple(np.clip(v, -(2**31), 2**31 - 1).astype(np.int32) for v in interval)
        xz = xz.astype(np.int32)
    step = max(1, CHUNK // max(1, n * features))
    for bit in range(len(site.faults)):
        dw = (_flip_all(stored, bit) - stored.astype(np.int64)).astype(xz.dtype)  # F × C
        for c0 in range(0, head.classes, step):
            cs = np.arange(c0, min(head.classes, c0 + step))
            move = xz[:, :, None] * dw[None, :, cs]  # N × F × c
            if interval is not None:
                sdc = (move < interval[0][:, None, cs]) | (move > interval[1][:, None, cs])
            else:
                value = head.requantise(wrap32(acc[:, None, cs] + move), cs)
                rows = np.broadcast_to(np.arange(n)[:, None, None], value.shape).reshape(-1)
                sdc = judge.sdc(rows, np.broadcast_to(cs, value.shape).reshape(-1),
                                value.reshape(-1)).reshape(value.shape)
            hit = np.flatnonzero((judge.top1 >= cs[0]) & (judge.top1 <= cs[-1]))  # images whose top-1 is here
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(np.count_nonzero(sdc))
            site.hit_faults[bit] += len(hit) * features  # type: ignore[index]
            site.hit_sdc[bit] += int(np.count_nonzero(sdc[hit, :, judge.top1[hit] - cs[0]]))  # type: ignore[index]
    return site


def _keep_interval(head: IntegerHead, acc: np.ndarray, judge: _Judge) -> tuple[np.ndarray, np.ndarray]:
    """For each image and class, the moves [lo, hi] of that class's accumulator that keep the image's top-1.

    The requantisation is non-decreasing and the judge monotone, so the top-1 class keeps first place above
    some accumulator and another class stays behind below one; both are found by bisection over the int32
    range, with the exact requantisation at every step.
    """
    n, classes = acc.shape
    own = np.arange(classes)[None, :] == judge.top1[:, None]
    rows, columns = np.indices(acc.shape).reshape(2, -1)

    def keeps(a: np.ndarray) -> np.ndarray:
        return ~judge.sdc(rows, columns, head.requantise(a).reshape(-1)).reshape(acc.shape)

    # the top-1 class: the smallest accumulator that keeps it (the golden one does)
    low, high = np.full_like(acc, -(2**31)), acc.copy()
    while (low < high).any():
        mid = (low + high) // 2
        ok = keeps(mid)
        low, high = np.where(ok | (low >= high), low, mid + 1), np.where(ok & (low < high), mid, high)
    first = low
    # every other class: the largest accumulator that keeps it behind
    low, high = acc.copy(), np.full_like(acc, 2**31 - 1)
    while (low < high).any():
        mid = (low + high + 1) // 2
        ok = keeps(mid)
        low, high = np.where(ok & (low < high), mid, low), np.where(ok | (low >= high), high, mid - 1)
    last = low
    big = np.int64(2**62)
    return np.where(own, first - acc, -big), np.where(own, big, last - acc)


def _bias(head: IntegerHead, acc: np.ndarray, judge: _Judge) -> ExactSiteResult:
    """b[c] flipped: class c's accumulator moves by Δb (wrapping at 32 bits, as the kernel's addition does)."""
    n = len(acc)
    site = _site(head, head.bias_name, "bias", head.bias, n)
    classes = np.broadcast_to(np.arange(head.classes)[None, :], acc.shape).reshape(-1)
    rows = np.broadcast_to(np.arange(n)[:, None], acc.shape).reshape(-1)
    hit = classes == judge.top1[rows]
    for bit in range(len(site.faults)):
        db = _flip_all(head.bias, bit) - head.bias.astype(np.int64)
        sdc = judge.sdc(rows, classes, head.requantise(wrap32(acc + db[None, :])).reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _input(head: IntegerHead, x: np.ndarray, acc: np.ndarray, judge: _Judge) -> ExactSiteResult:
    """x[n, f] flipped: every class's accumulator moves by Δx·(W[c, f] − zw), so all scores are recomputed."""
    n, features = x.shape
    site = _site(head, head.input, "input", x[0], n)
    site.hit_faults = site.hit_sdc = None
    step = max(1, CHUNK // max(1, n * head.classes))
    for bit in range(len(site.faults)):
        dx = _flip_all(x, bit) - x.astype(np.int64)  # N × F
        for f0 in range(0, features, step):
            fs = slice(f0, min(features, f0 + step))
            faulty = wrap32(acc[:, None, :] + dx[:, fs, None] * head.wz[None, fs, :])  # N × f × C
            sdc = judge.winners(head.requantise(faulty)) != judge.top1[:, None]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
    return site


def _output(head: IntegerHead, y: np.ndarray, judge: _Judge) -> ExactSiteResult:
    """y[n, c] flipped: that one stored score changes."""
    n = len(y)
    stored = y.astype(head.out_dtype)
    site = _site(head, head.output, "output", stored[0], n)
    classes = np.broadcast_to(np.arange(head.classes)[None, :], y.shape).reshape(-1)
    rows = np.broadcast_to(np.arange(n)[:, None], y.shape).reshape(-1)
    hit = classes == judge.top1[rows]
    for bit in range(len(site.faults)):
        sdc = judge.sdc(rows, classes, _flip_all(stored, bit).reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site
