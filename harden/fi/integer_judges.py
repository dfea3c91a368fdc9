"""Judging an integer classifier's faults from the stored outputs they make, and the fault-free state.

A fault that changes one class's stored output is an SDC when that class takes
first place from the top-1 class, or the top-1 class loses it; argmax keeps the
first of equal scores, and uint8 scores tie often. With an elementwise tail
every other class keeps its score, so that is two comparisons against a table
(`TableJudge`). A softmax mixes the classes: ONNX Runtime runs every row a
single-class fault can make (image × class × stored value) once (`RowJudge`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from harden.errors import HardenError
from harden.fi.integer_head import IntegerHead
from harden.graph.ort import expose
from harden.graph.parallel import run_model

# integers worked on at once per chunk (int64): a few tens of MB
CHUNK = 1 << 22
# scores a softmax tail may run through ONNX Runtime for the single-class table (images × classes × 2^8 rows
# of C): 78 images of a 1000-class head
ROW_BUDGET = 2 * 10**10


def stays(rivals_before: np.ndarray, rivals_after: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Whether the top-1 class keeps first place with score `value`: argmax takes the first of equal scores,
    so a rival before it must stay below, one after it may tie."""
    return (rivals_before < value) & (rivals_after <= value)


def wins(top_value: np.ndarray, value: np.ndarray, before_top: np.ndarray) -> np.ndarray:
    """Whether another class with score `value` takes first place from the top-1 class's `top_value`."""
    return (value > top_value) | ((value == top_value) & before_top)


class Judge(Protocol):
    """Decides faults from the stored outputs they make. `monotone`: a class's chance to stay first (or to
    stay behind) only grows (or shrinks) with its output, which the weight site's intervals need."""

    top1: np.ndarray
    monotone: bool

    def sdc(self, rows: np.ndarray, classes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """SDC of each fault that sets class classes[i]'s output of image rows[i] to values[i]."""

    def winners(self, y: np.ndarray) -> np.ndarray:
        """The top-1 class of each row of stored outputs (last axis: the classes)."""


class TableJudge:
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
        kept = np.where(classes == t, stays(self.before[rows], self.after[rows], value),
                        ~wins(self.top[rows], value, classes < t))
        return ~kept

    def winners(self, y: np.ndarray) -> np.ndarray:
        return np.argmax(self.head.scores(y), axis=-1)


class RowJudge:
    """A tail that mixes the classes (a softmax): the top-1 of every row a single-class fault can make
    (image × class × stored value), from ONNX Runtime once; whole rows run through it as they come."""

    def __init__(self, head: IntegerHead, y: np.ndarray, top1: np.ndarray) -> None:
        """`y`: the values the tail reads, N × C."""
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
    """The fault-free state the faults are judged against: the layer's stored input (N × F × P), its
    accumulators and stored outputs (N × C × P), the values the tail reads (N × C), the images' top-1
    classes, and the judge of faults."""

    x: np.ndarray
    acc: np.ndarray
    y: np.ndarray
    u: np.ndarray
    top1: np.ndarray
    judge: Judge


def golden_state(head: IntegerHead, inputs: np.ndarray, batch: int = 64,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0) -> Golden:
    """ONNX Runtime's fault-free run, and numpy's integer arithmetic checked against it bit for bit."""
    scores_name = head.model.graph.output[0].name
    names = list(dict.fromkeys([scores_name, head.input, head.output, head.pooled]))
    values = dict(zip(names, run_model(expose(head.model, names[1:]), inputs, names, "disable", batch, threads,
                                       providers)))
    n = len(inputs)
    x, y_ort = values[head.input], values[head.output]
    features, per_image = head.wz.shape[0], x.size // n
    if per_image % features or (head.op != "QLinearConv" and per_image != features):
        raise HardenError(f"exact analysis: {head.op} {head.node!r} reads {per_image} values per image for "
                          f"{features} features")
    pixels = per_image // features  # a 1×1 convolution's map, channels first
    if pixels > 1 and head.pool is None:
        raise HardenError(f"exact analysis: {head.op} {head.node!r} classifies each of {pixels} pixels, and no "
                          "QLinearGlobalAveragePool follows it; the scores must be one value per class")
    x = x.reshape(n, features, pixels)
    acc = head.accumulate(x)
    y = head.requantise(acc)
    if not np.array_equal(y.reshape(-1), y_ort.reshape(-1).astype(np.int64)):
        raise HardenError(f"exact analysis: numpy's requantisation of {head.op} {head.node!r} differs from ONNX "
                          f"Runtime's in {int((y.reshape(-1) != y_ort.reshape(-1)).sum())} of {y.size} values; "
                          "nothing can be judged exactly (the sampled campaign covers this model)")
    u = head.pool_sums(y.sum(axis=-1), pixels)
    if not np.array_equal(u.reshape(-1), values[head.pooled].reshape(-1).astype(np.int64)):
        raise HardenError(f"exact analysis: the pooled values after {head.op} {head.node!r}, from the sums of "
                          "its outputs, differ from ONNX Runtime's; nothing can be judged exactly")
    mine = head.run_tail(u) if head.mixes else head.scores(u)
    if not np.array_equal(mine.view(np.uint32), values[scores_name].reshape(n, -1).astype(np.float32)
                          .view(np.uint32)):
        raise HardenError(f"exact analysis: the nodes after {head.op} {head.node!r}, run on its outputs alone, "
                          "do not give the model's scores")
    top1 = np.argmax(mine, axis=1)
    return Golden(x, acc, y, u, top1, RowJudge(head, u, top1) if head.mixes else TableJudge(head, mine, top1))
