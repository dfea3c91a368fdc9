"""The exact final-layer analysis of a dynamically quantised classifier (quantize_dynamic's MatMulInteger, or a
1×1 ConvInteger on a pooled 1×1 map).

The classifier reads float features f[n] (C of them), which a DynamicQuantizeLinear
quantises at run time from that image's own range: xq = saturate(round(f / sx) + zx).
Its MatMulInteger accumulates exactly in int32,
acc[n, k] = Σ_c (xq[n, c] − zx[n])·(W[c, k] − zw[k]), and a Cast, a Mul by
m[n, k] = fl(sx[n]·sw[k]) and the bias Add make the scores,
s[n, k] = fl(fl(float32(acc[n, k])·m[n, k]) + b[k]). Each step after the accumulator is
one float32 operation, monotone in the accumulator, which numpy performs bit for bit
as ONNX Runtime does; that is checked on every analysed image before anything is
counted, and the analysis is refused where a single score differs.

- A weight W[c, k] (int8, as stored) moves acc[n, k] by δ·(xq[n, c] − zx[n]), an exact
  integer. Class k's score is monotone in its accumulator, so each image and class has
  an accumulator bound past which the top-1 changes (found by bisection over int32):
  every weight fault is then one integer comparison.
- A bias b[k] or an output s[n, k] (float32) sets one class's score to a value numpy
  computes exactly. Elementwise ops with constants may follow the layer (the text head's
  Mul by exp(s)): each is one float32 operation too, and a Mul's constant must be
  positive, so that the scores stay monotone in the accumulators.
- An input f[n, c] (float32): while the flipped value leaves the row's range
  [min(0, min f), max(0, max f)] as it was, sx and zx stay and only xq[n, c] changes,
  to what ONNX Runtime's QuantizeLinear makes of it with the row's own scale; every
  class's accumulator then moves by Δq·(W[c, :] − zw). Otherwise the whole row
  requantises, and ONNX Runtime runs the classifier on that row alone (a batch would
  share one scale, harden.graph.batching).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact import ExactResult, ExactSiteResult
from harden.fi.exact_site import SOFTMAX_TIE
from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.fi.graphinfo import GraphInfo
from harden.fi.integer_head import SHAPE_ONLY, constant_producers, flip_all
from harden.fi.outcome import fault_outcome, nonfinite_rows, top1_class
from harden.fi.suffix import extract
from harden.graph.ort import expose, make_session

# The most multiply-adds the input site's whole-row reruns may cost before the analysis is refused (as the integer
# projection's rows, harden.fi.integer_projection.ROW_BUDGET: about a minute of ONNX Runtime's int8 kernels here).
RERUN_BUDGET = 2e11
# Rows of scores evaluated at once.
CHUNK = 1 << 21
# What may follow the scores, over the classes.
ROWWISE = ("Softmax", "LogSoftmax")
# Scores this large could overflow a (Log)Softmax's max subtraction: such rows go to ONNX Runtime.
LARGE = 1e37


@dataclass
class DynamicHead:
    """A MatMulInteger classifier and what it stores, read from the graph (see the module docstring)."""

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


@dataclass
class _Golden:
    """Each analysed image's tensors, from ONNX Runtime run on that image alone."""

    f: np.ndarray  # N × C float32
    xq: np.ndarray  # N × C int64
    zx: np.ndarray  # N int64
    sx: np.ndarray  # N float32
    m: np.ndarray  # N × K float32
    acc: np.ndarray  # N × K int64
    output: np.ndarray  # N × K float32, the layer's output
    scores: np.ndarray  # N × K float32
    top1: np.ndarray
    feature_shape: tuple[int, ...] = ()  # one image's features as the graph holds them (1 × C, or 1 × C × 1 × 1)
    score_shape: tuple[int, ...] = ()  # and its scores
    ties: int = 0  # images left out: their top two scores are within a Softmax's tie band

    def keep(self, rows: np.ndarray) -> None:
        """Only these images from now on."""
        for name in ("f", "xq", "zx", "sx", "m", "acc", "output", "scores", "top1"):
            setattr(self, name, getattr(self, name)[rows])


class _Post:
    """Decides faulty score rows as the model does after them: argmax, or with a (Log)Softmax after the
    scores (`head.post`), argmax where the top two scores are more than SOFTMAX_TIE apart, and ONNX Runtime's
    own nodes on the other rows (and on rows that are not finite, or large enough to overflow)."""

    def __init__(self, head: DynamicHead, g: _Golden, providers: Sequence[str]) -> None:
        self.session = None
        if head.post:
            score = helper.make_tensor_value_info(head.scores, TensorProto.FLOAT, ["N", *g.score_shape[1:]])
            out = helper.make_tensor_value_info(head.post[-1].output[0], TensorProto.FLOAT, None)
            graph = helper.make_graph(list(head.post), "post", [score], [out],
                                      [t for t in head.model.graph.initializer
                                       if any(t.name in n.input for n in head.post)])
            model = helper.make_model(graph, opset_imports=list(head.model.opset_import))
            model.ir_version = head.model.ir_version
            self.session = make_session(model, providers=providers, opt_level="disable", threads=1, spinning=False)
        self.score_shape = g.score_shape

    def outcome(self, scores: np.ndarray, top1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SDC, non-finite) of full faulty score rows (R × K) against each row's golden top-1."""
        if self.session is None:
            return fault_outcome(scores, top1)
        top2 = np.sort(np.where(np.isnan(scores), -np.inf, scores), axis=1)[:, -2:]
        with np.errstate(invalid="ignore"):
            clear = (np.abs(scores) < LARGE).all(axis=1) & (top2[:, 1] - top2[:, 0] > SOFTMAX_TIE)
        sdc, due = top1_class(scores) != top1, np.zeros(len(scores), bool)
        if not clear.all():
            out = self.session.run(None, {self.session.get_inputs()[0].name: scores[~clear].reshape(
                -1, *self.score_shape[1:])})[0].reshape(int((~clear).sum()), -1)
            sdc[~clear], due[~clear] = fault_outcome(out, top1[~clear])
        return sdc, due


def analyse_dynamic_head(head: DynamicHead, inputs: np.ndarray,
                         providers: Sequence[str] = ("CPUExecutionProvider",)) -> ExactResult:
    """Exact SDC counts of every single-bit fault in the classifier's stored weight, its bias, input and output,
    over the model-ready `inputs`."""
    started = time.perf_counter()
    g = _golden(head, inputs, providers)
    post = _Post(head, g, providers)
    sites = [_weight(head, g, post), *([_bias(head, g, post)] if head.bias is not None else []),
             _input(head, g, post, inputs, providers), _output(head, g, post)]
    kind = " + ".join(["DynamicQuantizeLinear", head.op, *(n.op_type for n in head.post if n.op_type in ROWWISE)])
    return ExactResult(head=f"dynamic integer linear ({kind})", policy="none",
                       fmt="stored (int8 weight, float32 values)", images=len(g.acc), sites=sites,
                       seconds=time.perf_counter() - started, rounding_ties=g.ties)


def _golden(head: DynamicHead, inputs: np.ndarray, providers: Sequence[str]) -> _Golden:
    names = [head.scores, head.features, head.quantised, head.scale, head.zero, head.multiplier, head.accumulator,
             head.output, head.post[-1].output[0] if head.post else head.scores]
    session = make_session(expose(head.model, names), providers=providers, opt_level="disable", threads=1,
                           spinning=False)
    feed = head.model.graph.input[0].name
    runs = [session.run(names, {feed: inputs[i:i + 1]}) for i in range(len(inputs))]  # one image per run
    s, f, xq, sx, zx, m, acc, y, final = ([np.asarray(r[j]) for r in runs] for j in range(len(names)))
    n, k = len(inputs), head.classes
    if any(v.size != head.weight.shape[0] for v in f) or any(v.size != k for v in [*s, *acc]):
        raise HardenError("exact analysis: the dynamically quantised classifier's features or scores do not "
                          "have one row per image")
    g = _Golden(np.stack(f).reshape(n, -1).astype(np.float32), np.stack(xq).reshape(n, -1).astype(np.int64),
                np.array([int(z) for z in zx]), np.array([float(v) for v in sx], np.float32),
                np.stack([np.broadcast_to(v.reshape(-1), (k,)) for v in m]).astype(np.float32),
                np.stack(acc).reshape(n, k).astype(np.int64), np.stack(y).reshape(n, k).astype(np.float32),
                np.stack(s).reshape(n, k).astype(np.float32), np.zeros(0, np.int64))
    g.feature_shape, g.score_shape = tuple(f[0].shape), tuple(s[0].shape)
    if nonfinite_rows(g.scores).any():
        raise HardenError("exact analysis: the fault-free scores hold NaN or Inf for some images")
    if head.weight.shape[0] * 255 * 255 * 2 >= 2**31:
        raise HardenError("exact analysis: the classifier's int32 accumulator could wrap under a fault")
    mine = (g.xq - g.zx[:, None]) @ head.centred()
    if not np.array_equal(mine, g.acc) or not np.array_equal(
            head.layer_output(g.acc, g.m).view(np.uint32), g.output.view(np.uint32)) or not np.array_equal(
            head.after(g.output).view(np.uint32), g.scores.view(np.uint32)):
        raise HardenError("exact analysis: numpy does not reproduce ONNX Runtime's dynamically quantised "
                          "classifier bit for bit on these images")
    g.top1 = top1_class(np.stack(final).reshape(n, -1))
    if head.post:  # an image whose top two scores are within the Softmax's tie band is left out
        top2 = np.sort(g.scores, axis=1)[:, -2:]
        tied = (top2[:, 1] - top2[:, 0] <= SOFTMAX_TIE) | (top1_class(g.scores) != g.top1) | \
            (np.abs(g.scores) >= LARGE).any(axis=1)
        if tied.all():
            raise HardenError("exact analysis: on every image the top two scores are within the Softmax's tie "
                              "band; nothing can be judged exactly")
        g.ties = int(tied.sum())
        g.keep(np.flatnonzero(~tied))
    return g


def _rivals(g: _Golden) -> tuple[np.ndarray, np.ndarray]:
    """The best score after the top-1's, and the first class that has it."""
    others = np.where(np.arange(g.scores.shape[1])[None, :] == g.top1[:, None], -np.inf, g.scores)
    return others.max(axis=1), np.argmax(others, axis=1)


def _one_class_sdc(g: _Golden, rows: np.ndarray, ks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """SDC of each fault that sets class ks[i]'s score of image rows[i] to values[i] (NaN never wins)."""
    rival, rival_at = _rivals(g)
    e = np.where(np.isnan(values), -np.inf, values)
    t = g.top1[rows]
    top = g.scores[rows, t]
    wins = (e > top) | ((e == top) & (ks < t))
    keeps = (e > rival[rows]) | ((e == rival[rows]) & (t < rival_at[rows]))
    return np.where(ks == t, ~keeps, wins)


def _clear(g: _Golden, rows: np.ndarray, ks: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(surely an SDC, surely not) for faults that each set class ks[i]'s score of image rows[i] to values[i],
    where a (Log)Softmax follows: the score passes the top-1's (for the top-1 class, the best rival's) by more
    than SOFTMAX_TIE, one way or the other, and stays below LARGE. Every other fault goes to ONNX Runtime."""
    rival, _ = _rivals(g)
    t = g.top1[rows]
    other = np.where(ks == t, rival[rows], g.scores[rows, t])
    with np.errstate(invalid="ignore"):
        small = np.abs(values) < LARGE
        above = small & (values - SOFTMAX_TIE > other)
        below = small & (values + SOFTMAX_TIE < other)
    return np.where(ks == t, below, above), np.where(ks == t, above, below)


def _one_class_outcome(g: _Golden, post: _Post, rows: np.ndarray, ks: np.ndarray,
                       values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SDC, non-finite) of faults that each set class ks[i]'s score of image rows[i] to values[i]."""
    if post.session is None:
        return _one_class_sdc(g, rows, ks, values), ~np.isfinite(values)
    sure_sdc, sure_keep = _clear(g, rows, ks, values)
    unclear = ~(sure_sdc | sure_keep)
    sdc, due = sure_sdc.copy(), np.zeros(len(rows), bool)
    if unclear.any():
        full = g.scores[rows[unclear]].copy()
        full[np.arange(len(full)), ks[unclear]] = values[unclear]
        sdc[unclear], due[unclear] = post.outcome(full, g.top1[rows[unclear]])
    return sdc, due


def _bounds(head: DynamicHead, g: _Golden, changes: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
            ) -> np.ndarray:
    """For each image and class, how far its accumulator can move before `changes` (rows, classes, scores →
    bool, monotone in the score) turns true: for the top-1 class the smallest value where it is still false,
    for the others the largest (N × K)."""
    n, k = g.acc.shape
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))
    ks = np.broadcast_to(np.arange(k)[None, :], (n, k))
    top = ks == g.top1[:, None]
    # invariant: at `good` it is false, at `bad` true (or `bad` lies past int32's range)
    good, bad = g.acc.copy(), np.where(top, -2**31 - 1, 2**31)
    if not (np.abs(head.logits(bad, g.m)) < LARGE).all():
        raise HardenError("exact analysis: the classifier's scale lets a faulty accumulator reach scores that "
                          "could overflow")
    while True:
        gap = np.abs(bad - good) > 1
        if not gap.any():
            return good
        mid = (good + bad) // 2
        hit = changes(rows.reshape(-1), ks.reshape(-1), head.logits(mid, g.m).reshape(-1)).reshape(n, k)
        bad = np.where(gap & hit, mid, bad)
        good = np.where(gap & ~hit, mid, good)


def _weight(head: DynamicHead, g: _Golden, post: _Post) -> ExactSiteResult:
    """W[c, k] flipped: class k's accumulator moves by δ·(xq[n, c] − zx[n]); a comparison with its bound, or
    with a Softmax after the scores two bounds, between which ONNX Runtime decides."""
    n = len(g.acc)
    site = ExactSiteResult.for_stored(head.weight_name, "weight", head.node, head.weight, n)
    top = np.arange(head.classes)[None, :] == g.top1[:, None]  # N × K
    if post.session is None:
        sdc_edge = keep_edge = _bounds(head, g, lambda r, k, v: _one_class_sdc(g, r, k, v))
    else:
        sdc_edge = _bounds(head, g, lambda r, k, v: _clear(g, r, k, v)[0])
        keep_edge = _bounds(head, g, lambda r, k, v: ~_clear(g, r, k, v)[1])
    x = g.xq - g.zx[:, None]  # N × C
    for bit in range(len(site.faults)):
        delta = flip_all(head.weight, bit) - head.weight.astype(np.int64)  # C × K
        for c in range(head.weight.shape[0]):
            moved = g.acc + x[:, c:c + 1] * delta[c][None, :]
            sdc = np.where(top, moved < sdc_edge, moved > sdc_edge)
            unclear = ~sdc & np.where(top, moved < keep_edge, moved > keep_edge)
            if unclear.any():
                r, k = np.nonzero(unclear)
                acc = g.acc[r].copy()
                acc[np.arange(len(r)), k] = moved[r, k]
                values = head.logits(acc, g.m[r])[np.arange(len(r)), k]
                sdc[r, k], due = _one_class_outcome(g, post, r, k, values)
                site.due[bit] += int(due.sum())
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
            site.hit_faults[bit] += int(top.sum())  # type: ignore[index]
            site.hit_sdc[bit] += int((sdc & top).sum())  # type: ignore[index]
    return site


def _float_flips(values: np.ndarray, bit: int) -> np.ndarray:
    """Every element of float32 `values` with `bit` flipped (bit 31: the sign), in one array."""
    flat = values.astype(np.float32).reshape(-1)
    return flip(flat, np.full(flat.size, bit), "fp32").reshape(values.shape)


def _one_class_site(g: _Golden, post: _Post, site: ExactSiteResult, faulty: list[np.ndarray]) -> ExactSiteResult:
    """Count faults that each set one class's score: faulty[bit] is N × K, the new score of that class."""
    n, k = g.scores.shape
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k)).reshape(-1)
    ks = np.broadcast_to(np.arange(k)[None, :], (n, k)).reshape(-1)
    hit = ks == g.top1[rows]
    for bit, values in enumerate(faulty):
        sdc, due = _one_class_outcome(g, post, rows, ks, values.reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.due[bit] += int(due.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _bias(head: DynamicHead, g: _Golden, post: _Post) -> ExactSiteResult:
    """b[k] flipped: class k's layer output is fl(y[n, k] + b'[k]) with y the rescaled accumulator, then the
    tail's ops."""
    assert head.bias is not None
    site = ExactSiteResult.for_stored(head.bias_name, "bias", head.node, head.bias, len(g.acc))
    faulty = [head.after(head.layer_output(g.acc, g.m, _float_flips(head.bias, bit))) for bit in range(32)]
    return _one_class_site(g, post, site, faulty)


def _output(head: DynamicHead, g: _Golden, post: _Post) -> ExactSiteResult:
    """The layer's output y[n, k] flipped: that score alone, through the tail's ops."""
    site = ExactSiteResult.for_stored(head.output, "output", head.node, g.output[0], len(g.acc))
    return _one_class_site(g, post, site, [head.after(_float_flips(g.output, bit)) for bit in range(32)])


def _input(head: DynamicHead, g: _Golden, post: _Post, inputs: np.ndarray,
           providers: Sequence[str]) -> ExactSiteResult:
    """f[n, c] flipped: the row's quantisation kept (one quantised value moves every class's accumulator), or
    the row requantised whole and rerun through ONNX Runtime."""
    n, c = g.f.shape
    site = ExactSiteResult.for_stored(head.features, "input", head.node, g.f[0], n, hits=False)
    faulty = np.stack([_float_flips(g.f, bit) for bit in range(32)])  # 32 × N × C
    kept = _range_kept(g.f, faulty)
    reruns = int((~kept).sum())
    if reruns * c * head.classes > RERUN_BUDGET:
        most = max(1, int(n * RERUN_BUDGET / (reruns * c * head.classes)))
        raise HardenError(f"exact analysis: {reruns:,} input faults of the dynamically quantised classifier change "
                          f"their row's quantisation and must each rerun it; this allows at most {most} images "
                          "(certify with a smaller --limit)")
    faults, sdc, due = np.zeros(32, np.int64), np.zeros(32, np.int64), np.zeros(32, np.int64)
    quantise = _quantiser(providers)
    centred = head.centred()
    step = max(1, CHUNK // head.classes)
    for i in range(n):
        if not np.array_equal(quantise(g.f[i], g.sx[i], g.zx[i]), g.xq[i]):
            raise HardenError("exact analysis: ONNX Runtime's QuantizeLinear does not reproduce the classifier's "
                              "dynamic quantisation of its features")
        bits, cols = np.nonzero(kept[:, i, :])
        np.add.at(faults, bits, 1)
        dq = quantise(faulty[bits, i, cols], g.sx[i], g.zx[i]) - g.xq[i, cols]
        moved = np.flatnonzero(dq != 0)  # an unchanged quantised value leaves every score as it was
        for start in range(0, len(moved), step):
            sel = moved[start:start + step]
            acc = g.acc[i][None, :] + dq[sel, None] * centred[cols[sel]]
            hit, bad = post.outcome(head.logits(acc, g.m[i][None, :]), np.full(len(sel), g.top1[i]))
            np.add.at(sdc, bits[sel], hit)
            np.add.at(due, bits[sel], bad)
    if reruns:
        tail = _tail_session(head, inputs, providers)
        for b, r, col in zip(*(a.tolist() for a in np.nonzero(~kept))):
            x = g.f[r:r + 1].copy()
            x[0, col] = faulty[b, r, col]
            out = tail.run(None, {head.features: x.reshape(g.feature_shape)})[0].reshape(1, -1)
            faults[b] += 1
            hit, bad = fault_outcome(out, g.top1[r:r + 1])
            sdc[b] += int(hit[0])
            due[b] += int(bad[0])
    site.faults, site.sdc, site.due = faults.tolist(), sdc.tolist(), due.tolist()
    site.recomputed = reruns
    return site


def _range_kept(f: np.ndarray, faulty: np.ndarray) -> np.ndarray:
    """Whether each flipped value (bits × N × C) leaves its row's range [min(0, min f), max(0, max f)], and so
    the DynamicQuantizeLinear's scale and zero point, as they were. NaN never does."""
    lo, hi = np.minimum(f.min(axis=1), 0), np.maximum(f.max(axis=1), 0)
    order = np.sort(f, axis=1)
    top, bottom = f == order[:, -1:], f == order[:, :1]
    # each element's row range without it: the second best where it alone holds the best
    hi_without = np.where(top & (top.sum(axis=1, keepdims=True) == 1), order[:, -2:-1], order[:, -1:])
    lo_without = np.where(bottom & (bottom.sum(axis=1, keepdims=True) == 1), order[:, 1:2], order[:, :1])
    with np.errstate(invalid="ignore"):
        new_hi = np.maximum(np.maximum(hi_without, np.float32(0))[None], faulty)
        new_lo = np.minimum(np.minimum(lo_without, np.float32(0))[None], faulty)
        return (new_hi == hi[None, :, None]) & (new_lo == lo[None, :, None])


def _quantiser(providers: Sequence[str]):  # type: ignore[no-untyped-def]
    """ONNX Runtime's QuantizeLinear (to uint8, as DynamicQuantizeLinear writes) with a given scale and zero
    point: what the DynamicQuantizeLinear makes of a value once its row's scale is known."""
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R"]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                                            helper.make_tensor_value_info("z", TensorProto.UINT8, [])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, ["R"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = make_session(model, providers=providers, opt_level="disable", threads=1, spinning=False)

    def quantise(x: np.ndarray, scale: np.floating, zero: int) -> np.ndarray:
        feeds = {"x": np.asarray(x, np.float32).reshape(-1), "s": np.asarray(scale, np.float32),
                 "z": np.asarray(zero, np.uint8)}
        return session.run(None, feeds)[0].astype(np.int64)

    return quantise


def _tail_session(head: DynamicHead, inputs: np.ndarray, providers: Sequence[str]):  # type: ignore[no-untyped-def]
    """The classifier from its float features to the scores, run one row at a time."""
    info = GraphInfo(head.model, example=inputs[:1], providers=providers)
    final = head.post[-1].output[0] if head.post else head.scores
    return make_session(extract(info, [head.features], [final]), providers=providers, opt_level="disable",
                        threads=1, spinning=False)
