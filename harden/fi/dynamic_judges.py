"""How the exact analysis of a dynamically quantised classifier decides a fault from the scores it makes.

A fault that changes one class's score is an SDC when that class takes first place
from the top-1 class, or the top-1 class loses it; argmax keeps the first of equal
scores, and NaN never wins (harden.fi.outcome). Where a Softmax or LogSoftmax follows,
the scores decide a fault only when the changed score clears its rival by more than
the Softmax's tie band; ONNX Runtime's own (Log)Softmax decides the rest (`Post`).
Weight faults move an integer accumulator, and `bounds` finds, per image and class,
how far it can move before the decision changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from harden.errors import HardenError
from harden.fi.dynamic_head import DynamicHead
from harden.fi.exact_site import SOFTMAX_TIE
from harden.fi.integer_judges import stays, wins
from harden.fi.outcome import fault_outcome, top1_class
from harden.graph.ort import make_session

# Scores this large could overflow a (Log)Softmax's max subtraction: such rows go to ONNX Runtime.
LARGE = 1e37


@dataclass
class Golden:
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


class Post:
    """Decides faulty score rows as the model does after them: argmax, or with a (Log)Softmax after the
    scores (`head.post`), argmax where the top two scores are more than SOFTMAX_TIE apart, and ONNX Runtime's
    own nodes on the other rows (and on rows that are not finite, or large enough to overflow)."""

    def __init__(self, head: DynamicHead, g: Golden, providers: Sequence[str]) -> None:
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


def _rivals(g: Golden) -> tuple[np.ndarray, np.ndarray]:
    """The best score of the classes before the top-1 class, and of those after it (−inf where none)."""
    order = np.arange(g.scores.shape[1])[None, :]
    before = np.where(order < g.top1[:, None], g.scores, -np.inf).max(axis=1)
    return before, np.where(order > g.top1[:, None], g.scores, -np.inf).max(axis=1)


def one_class_sdc(g: Golden, rows: np.ndarray, ks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """SDC of each fault that sets class ks[i]'s score of image rows[i] to values[i]: the integer judges' argmax
    rules (harden.fi.integer_judges), with NaN never winning."""
    before, after = _rivals(g)
    e = np.where(np.isnan(values), -np.inf, values)
    t = g.top1[rows]
    kept = np.where(ks == t, stays(before[rows], after[rows], e), ~wins(g.scores[rows, t], e, ks < t))
    return ~kept


def clear(g: Golden, rows: np.ndarray, ks: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(surely an SDC, surely not) for faults that each set class ks[i]'s score of image rows[i] to values[i],
    where a (Log)Softmax follows: the score passes the top-1's (for the top-1 class, the best rival's) by more
    than SOFTMAX_TIE, one way or the other, and stays below LARGE. Every other fault goes to ONNX Runtime."""
    rival = np.maximum(*_rivals(g))
    t = g.top1[rows]
    other = np.where(ks == t, rival[rows], g.scores[rows, t])
    with np.errstate(invalid="ignore"):
        small = np.abs(values) < LARGE
        above = small & (values - SOFTMAX_TIE > other)
        below = small & (values + SOFTMAX_TIE < other)
    return np.where(ks == t, below, above), np.where(ks == t, above, below)


def one_class_outcome(g: Golden, post: Post, rows: np.ndarray, ks: np.ndarray,
                       values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SDC, non-finite) of faults that each set class ks[i]'s score of image rows[i] to values[i]."""
    if post.session is None:
        return one_class_sdc(g, rows, ks, values), ~np.isfinite(values)
    sure_sdc, sure_keep = clear(g, rows, ks, values)
    unclear = ~(sure_sdc | sure_keep)
    sdc, due = sure_sdc.copy(), np.zeros(len(rows), bool)
    if unclear.any():
        full = g.scores[rows[unclear]].copy()
        full[np.arange(len(full)), ks[unclear]] = values[unclear]
        sdc[unclear], due[unclear] = post.outcome(full, g.top1[rows[unclear]])
    return sdc, due


def bounds(head: DynamicHead, g: Golden, changes: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
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
