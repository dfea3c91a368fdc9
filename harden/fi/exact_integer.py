"""The exact final-layer analysis of an integer classifier: a QOperator graph's QGemm head.

A quantised deployment's classifier is a QGemm: its int32 accumulator is
exact integer arithmetic, acc[n, c] = Σ_f (x[n, f] − zx)·(W[c, f] − zw[c]) + b[c]
(wrapping at 32 bits, as the kernel adds), and its output is requantised once,
y = saturate(round_half_even(float32(acc) · M[c]) + zy) with M = sx·sw/sy in
float32. A single flipped bit changes acc by an exact integer: (x − zx)·Δw in
one class for a weight, Δb for a bias, Δx·(W[:, f] − zw) across the classes for
an input, and the output y itself for an output fault. So every fault × image is
decided by integer arithmetic and one requantisation, with no rounding bound to
allow for. The requantisation is checked against ONNX Runtime's own output on
every analysed image before anything is counted; where it differs in a single
value the analysis is refused rather than approximated. The scores are the
output dequantised (an increasing map, so top-1 and ties are the integers'),
through shape-only ops at most.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact import ExactResult, ExactSiteResult
from harden.fi.graphinfo import bypass_constant_views, named_copy
from harden.graph.ort import expose
from harden.graph.parallel import run_model

SHAPE_ONLY = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
# integers worked on at once per chunk (int64): a few tens of MB
CHUNK = 1 << 22


class IntegerHead:
    """A QGemm classifier's stored integers and quantisation parameters, and its exact arithmetic."""

    def __init__(self, model: onnx.ModelProto) -> None:
        model = named_copy(model)
        bypass_constant_views(model)
        producer = {o: n for n in model.graph.node for o in n.output if o}
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        scores = model.graph.output[0].name
        node = producer.get(scores)
        while node is not None and node.op_type in SHAPE_ONLY:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            found = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
            raise HardenError(f"exact analysis: the integer classifier's scores come from {found}; the analysis "
                              "covers a QGemm whose output is dequantised into the scores")
        gemm = producer.get(node.input[0])
        if gemm is None or gemm.op_type != "QGemm":
            found = "a graph input" if gemm is None else f"{gemm.op_type} {gemm.name!r}"
            raise HardenError(f"exact analysis: the dequantised scores come from {found}; the analysis of an "
                              "integer classifier covers QGemm (quantize_static's QOperator Gemm)")
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        names = list(gemm.input) + [""] * (9 - len(gemm.input))
        needed = [names[i] for i in (1, 2, 3, 4, 5, 6, 7, 8)]
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or any(  # type: ignore[arg-type]
                t and t not in constants for t in needed) or not names[3] or not names[6] or not names[7]:
            raise HardenError(f"exact analysis: QGemm {gemm.name!r} needs constant B, C and quantisation "
                              "parameters, alpha 1 and no transA")
        self.node, self.input, self.output = gemm.name, names[0], gemm.output[0]
        self.weight_name, self.bias_name = names[3], names[6]
        self.stored_weight = constants[names[3]]
        weight = self.stored_weight.T if attrs.get("transB", 0) else self.stored_weight  # F × C
        self.classes = weight.shape[1]
        self.transposed = bool(attrs.get("transB", 0))
        self.zx = int(constants[names[2]].reshape(-1)[0]) if names[2] else 0
        zw = constants[names[5]].astype(np.int64).reshape(-1) if names[5] else np.zeros(1, np.int64)
        self.wz = weight.astype(np.int64) - np.broadcast_to(zw, (self.classes,))[None, :]  # (W − zw), F × C
        self.bias = constants[names[6]]
        if self.bias.size != self.classes:
            raise HardenError(f"exact analysis: QGemm {gemm.name!r} has a bias of {self.bias.size} values for "
                              f"{self.classes} classes")
        sx = np.float32(constants[names[1]].reshape(-1)[0])
        sw = constants[names[4]].astype(np.float32).reshape(-1)
        sy = np.float32(constants[names[7]].reshape(-1)[0])
        self.multiplier = np.broadcast_to((sx * sw) / sy, (self.classes,)).astype(np.float32)
        self.zy = int(constants[names[8]].reshape(-1)[0]) if names[8] else 0
        self.out_dtype = np.dtype(np.uint8) if not names[8] else constants[names[8]].dtype
        self.model = model

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


class _Scorer:
    """Decides single-class faults: class c's stored output becomes `value`, every other class keeps its own."""

    def __init__(self, y: np.ndarray, top1: np.ndarray) -> None:
        n, classes = y.shape
        self.top1, self.top = top1, y[np.arange(n), top1]
        masked = np.where(np.arange(classes)[None, :] < top1[:, None], y, np.iinfo(np.int64).min)
        self.before = masked.max(axis=1)  # the best rival before the top-1 class (or −inf)
        masked = np.where(np.arange(classes)[None, :] > top1[:, None], y, np.iinfo(np.int64).min)
        self.after = masked.max(axis=1)

    def sdc(self, rows: np.ndarray, classes: np.ndarray, value: np.ndarray) -> np.ndarray:
        """SDC of each fault (image rows[i], class classes[i], new output value[i])."""
        t = self.top1[rows]
        own = classes == t
        kept = np.where(own, _stays(self.before[rows], self.after[rows], value),
                        ~_wins(self.top[rows], value, classes < t))
        return ~kept


def analyse_integer_head(model: onnx.ModelProto, inputs: np.ndarray, batch: int = 64,
                         providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> ExactResult:
    """Exact SDC counts of every single-bit fault in a QGemm classifier's weight, bias, input and output, over
    the model-ready `inputs`, each flipped in the integer type it is stored in."""
    started = time.perf_counter()
    head = IntegerHead(model)
    scores_name = head.model.graph.output[0].name
    names = [scores_name, head.input, head.output]
    scores, x, y_ort = run_model(expose(head.model, names[1:]), inputs, names, "disable", batch, threads, providers)
    n = len(inputs)
    x, y_ort = x.reshape(n, -1), y_ort.reshape(n, -1).astype(np.int64)
    acc = head.accumulate(x)
    y = head.requantise(acc)
    if not np.array_equal(y, y_ort):
        raise HardenError(f"exact analysis: numpy's requantisation of QGemm {head.node!r} differs from ONNX "
                          f"Runtime's in {int((y != y_ort).sum())} of {y.size} values; nothing can be judged "
                          "exactly (the sampled campaign covers this model)")
    top1 = np.argmax(scores.reshape(n, -1).astype(np.float32), axis=1)
    if not np.array_equal(top1, np.argmax(y, axis=1)):
        raise HardenError("exact analysis: the scores' top-1 is not the integer outputs' (something after the "
                          "QGemm reorders them)")
    scorer = _Scorer(y, top1)
    sites = [_weight(head, x, acc, scorer), _bias(head, acc, scorer), _input(head, x, acc, top1),
             _output(head, y, scorer)]
    return ExactResult(head="integer linear (QGemm)", policy="none", fmt="stored integers", images=n, sites=sites,
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


def _weight(head: IntegerHead, x: np.ndarray, acc: np.ndarray, scorer: _Scorer) -> ExactSiteResult:
    """W[c, f] flipped: class c's accumulator moves by (x[n, f] − zx)·Δw on every image."""
    n = len(x)
    site = _site(head, head.weight_name, "weight", head.stored_weight, n)
    xz = x.astype(np.int64) - head.zx  # N × F
    features = xz.shape[1]
    stored = head.stored_weight.T if head.transposed else head.stored_weight  # F × C
    step = max(1, CHUNK // max(1, n * features))
    for bit in range(len(site.faults)):
        dw = _flip_all(stored, bit) - stored.astype(np.int64)  # F × C
        for c0 in range(0, head.classes, step):
            cs = np.arange(c0, min(head.classes, c0 + step))
            faulty = wrap32(acc[:, None, cs] + xz[:, :, None] * dw[None, :, cs])  # N × F × c
            value = head.requantise(faulty, cs)
            rows = np.broadcast_to(np.arange(n)[:, None, None], value.shape).reshape(-1)
            classes = np.broadcast_to(cs[None, None, :], value.shape).reshape(-1)
            sdc = scorer.sdc(rows, classes, value.reshape(-1))
            hit = classes == scorer.top1[rows]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
            site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
            site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _bias(head: IntegerHead, acc: np.ndarray, scorer: _Scorer) -> ExactSiteResult:
    """b[c] flipped: class c's accumulator moves by Δb (wrapping at 32 bits, as the kernel's addition does)."""
    n = len(acc)
    site = _site(head, head.bias_name, "bias", head.bias, n)
    classes = np.broadcast_to(np.arange(head.classes)[None, :], acc.shape).reshape(-1)
    rows = np.broadcast_to(np.arange(n)[:, None], acc.shape).reshape(-1)
    hit = classes == scorer.top1[rows]
    for bit in range(len(site.faults)):
        db = _flip_all(head.bias, bit) - head.bias.astype(np.int64)
        value = head.requantise(wrap32(acc + db[None, :]))
        sdc = scorer.sdc(rows, classes, value.reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _input(head: IntegerHead, x: np.ndarray, acc: np.ndarray, top1: np.ndarray) -> ExactSiteResult:
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
            winner = np.argmax(head.requantise(faulty), axis=2)
            sdc = winner != top1[:, None]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
    return site


def _output(head: IntegerHead, y: np.ndarray, scorer: _Scorer) -> ExactSiteResult:
    """y[n, c] flipped: that one stored score changes."""
    n = len(y)
    stored = y.astype(head.out_dtype)
    site = _site(head, head.output, "output", stored[0], n)
    classes = np.broadcast_to(np.arange(head.classes)[None, :], y.shape).reshape(-1)
    rows = np.broadcast_to(np.arange(n)[:, None], y.shape).reshape(-1)
    hit = classes == scorer.top1[rows]
    for bit in range(len(site.faults)):
        sdc = scorer.sdc(rows, classes, _flip_all(stored, bit).reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site
