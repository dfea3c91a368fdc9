"""The evaluation set of a campaign: golden run, the paper's image filter, and range profiling.

Following the paper (and goldeneye), only images the fault-free model classifies
correctly with a strictly positive Top2Diff are used, so that an SDC is always a
change away from a correct, unambiguous answer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import EvalHeader
from harden.fi.nodes import NodeSessions, node_pass
from harden.fi.profile import PROFILE_BYTES, finite_peak, profile_ranges, profile_with_outputs
from harden.graph.parallel import run_model


@dataclass
class EvalSet:
    """Model-ready inputs of the kept images, with their golden results and the profiled ranges."""

    inputs: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    golden_class: np.ndarray
    top2diff: np.ndarray
    ranges: dict[str, float]
    total: int
    correct: int
    probabilities: bool = False

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def header(self) -> dict[str, object]:
        """What the campaign header records about the evaluation set."""
        return EvalHeader(self.total, self.correct, [int(i) for i in self.ids], [float(t) for t in self.top2diff],
                          dict(self.ranges), self.probabilities).to_dict()


def are_probabilities(scores: np.ndarray) -> bool:
    """Whether a model's outputs are already probabilities (an exported Softmax): rows ≥ 0 summing to 1."""
    s = scores.astype(np.float64)
    return bool(np.isfinite(s).all() and (s >= 0).all() and np.allclose(s.sum(axis=1), 1.0, atol=1e-4))


def softmax_top2diff(scores: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """(softmax top-1 − top-2) × 100 per row, computed in float64 (no softmax for probability outputs)."""
    s = scores.astype(np.float64)
    if probabilities:
        p = s
    else:
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)[:, -2:]
    return (top[:, 1] - top[:, 0]) * 100.0


def prepare_eval(model: onnx.ModelProto, inputs: np.ndarray, labels: np.ndarray, tensors: Sequence[str] = (),
                 profile_inputs: np.ndarray | None = None, batch: int = 64,
                 providers: Sequence[str] = ("CPUExecutionProvider",), opt_level: str = "disable",
                 threads: int = 0, budget: int = PROFILE_BYTES) -> EvalSet:
    """Golden run on `inputs`, keep correct images with Top2Diff > 0, profile `tensors` on `profile_inputs`.

    The profiling set defaults to the evaluation inputs themselves; then, at
    level 'disable' or 'all', one pass gives both the golden scores and the
    ranges (exposing a tensor never changes a kernel at 'disable'; at 'all' it
    can only block a fusion, which changes no class in practice, and the
    engines that run at 'all' take each site's golden scores from their own
    fault-free runs anyway). `budget` bounds the profiled tensors the runs
    going at once hold (profile_with_outputs).
    """
    output = model.graph.output[0].name
    ranges: dict[str, float] | None = None
    if tensors and profile_inputs is None and opt_level in ("disable", "all"):
        ranges, (scores,) = profile_with_outputs(model, inputs, list(tensors), [output], batch, providers, threads,
                                                 opt_level, budget)
    else:
        (scores,) = run_model(model, inputs, [output], opt_level, batch, threads, providers)
    if ranges is None:
        ranges = profile_ranges(model, inputs if profile_inputs is None else profile_inputs, list(tensors),
                                batch=batch, providers=providers, threads=threads, budget=budget) if tensors else {}
    return select_eval(inputs, labels, scores, ranges)


def _kept(scores: np.ndarray, labels: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's filter: (kept positions, golden class, Top2Diff) of correct, finite rows with Top2Diff > 0."""
    golden = np.argmax(scores, axis=1)
    t2d = softmax_top2diff(scores, probabilities)
    keep = np.flatnonzero((golden == labels) & (t2d > 0) & np.isfinite(scores).all(axis=1))
    return keep, golden, t2d


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Refuse labels the model cannot score, before any pass over the images where the class count is known."""
    if labels.max(initial=0) >= classes:
        raise HardenError(f"labels go up to {int(labels.max())} but the model scores {classes} classes")


def select_eval(inputs: np.ndarray, labels: np.ndarray, scores: np.ndarray, ranges: dict[str, float]) -> EvalSet:
    """The evaluation set of golden `scores`, after checking that they are class scores for these labels."""
    if scores.ndim != 2 or scores.shape[0] != len(inputs) or scores.shape[1] < 2:
        raise HardenError(f"model output has shape {list(scores.shape)}; expected class scores N×C with C ≥ 2")
    check_labels(labels, scores.shape[1])
    probabilities = are_probabilities(scores)
    keep, golden, t2d = _kept(scores, labels, probabilities)
    correct = int((golden == labels).sum())
    if len(keep) == 0:
        if correct:  # correct but tied: a constant output, e.g. an untrained (zero) classifier
            which = "the one correctly classified image has" if correct == 1 else \
                f"all {correct} correctly classified images have"
            raise HardenError(f"{which} tied top-two scores (Top2Diff 0) or non-finite ones, so no fault can "
                              "change a class; is the classifier trained?")
        raise HardenError(f"no evaluation image is classified correctly (accuracy {correct / len(labels):.1%}); "
                          "check the data and preprocessing")
    return EvalSet(np.ascontiguousarray(inputs[keep]), labels[keep].astype(np.int64), keep, golden[keep],
                   t2d[keep], ranges, int(len(inputs)), correct, probabilities)


def prepare_eval_nodes(sessions: NodeSessions, inputs: np.ndarray, labels: np.ndarray, tensors: Sequence[str],
                       batch: int, keep: set[str], block_images: int,
                       progress: bool = False) -> tuple[EvalSet, dict[str, np.ndarray] | None]:
    """prepare_eval through the cone engine's node-by-node sessions, also returning the first cache block.

    The cone needs every tensor of a node-by-node run of each block anyway, so
    this one pass gives the golden scores, the ranges of `tensors` and the
    tensors in `keep` of the first `block_images` kept images: the campaign
    then runs each image through the model once instead of twice. With
    `progress`, a bar on stderr counts the images (the pass is one forward
    pass per image, long enough on a large model to want one). The block is
    None in the rare case it cannot be told in one pass (a row with distinct
    top scores whose softmax Top2Diff rounds to 0 came before the block filled).
    """
    from tqdm import tqdm

    info = sessions.info
    peaks = dict.fromkeys(tensors, 0.0)
    scores: list[np.ndarray] = []
    block: dict[str, np.ndarray] = {}
    held: list[int] = []  # input positions of the rows in `block`, in order

    def seen(name: str, value: np.ndarray) -> None:
        if name in peaks:
            peaks[name] = max(peaks[name], finite_peak(value))

    # Chunks no larger than the block, so that the first one's arrays can become it (_hold). Once the block
    # is full, a chunk keeps nothing but its scores: each tensor goes after its last reader.
    step = min(batch, block_images)
    with tqdm(total=len(inputs), unit="img", desc="golden", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for first in range(0, len(inputs), step):
            wanted = keep if len(held) < block_images else set()
            for offset, values in node_pass(sessions, inputs[first:first + step], step, wanted, seen):
                start = first + offset
                chunk = values[info.scores]
                bar.update(len(chunk))
                scores.append(chunk)
                room = block_images - len(held)
                if room > 0 and chunk.ndim == 2 and chunk.shape[1] >= 2:
                    rows = _candidates(chunk, labels[start:start + len(chunk)])[:room]
                    _hold(info, block, len(held), block_images, {n: values[n] for n in keep | {info.scores}},
                          rows, inputs)
                    held.extend((start + rows).tolist())
    ev = select_eval(inputs, labels, np.concatenate(scores), peaks)
    return ev, _first_block(info, block, held, [int(p) for p in ev.ids[:block_images]])


def _candidates(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows that may pass the paper's filter, whatever kind of scores: correct, finite, distinct top two."""
    top = np.sort(scores, axis=1)[:, -2:]
    ok = (np.argmax(scores, axis=1) == labels) & np.isfinite(scores).all(axis=1) & (top[:, 1] > top[:, 0])
    return np.flatnonzero(ok)


def _hold(info: GraphInfo, block: dict[str, np.ndarray], at: int, size: int, values: dict[str, np.ndarray],
          rows: np.ndarray, inputs: np.ndarray) -> None:
    """Write `rows` of each tensor in `values` into `block` (arrays of `size` images) from position `at`.

    Where a chunk's own output array has the block's size, it becomes
    the block: its held rows move up in place and later chunks copy theirs in
    after them. A second, fresh block costs more than the copy suggests: on a
    224 px ResNet-18 the block is 735 MB, and writing that much new memory took
    0.8-2.5 s of a 40 s campaign on this project's cloud VM, where memory a
    process touches first is slow. An array that shares memory with the images
    or with another tensor (an input fed through, or an aliasing output) is
    never written in place; it gets a block of its own, and so do the scores,
    which the caller keeps whole.
    """
    for name, value in values.items():
        if not info.per_image(name):  # shape arithmetic: the same for every chunk
            block.setdefault(name, value)
            continue
        if name not in block:
            if len(value) == size and name != info.scores and _own(value, values, inputs):
                block[name] = value
            else:
                block[name] = np.empty((size, *value.shape[1:]), dtype=value.dtype)
        target = block[name]
        for i, row in enumerate(rows.tolist()):  # a slice copy per row: 2-3x faster than a fancy index here
            if target is not value or row != at + i:  # in place, rows only move up (row ≥ at + i)
                target[at + i] = value[row]


def _own(value: np.ndarray, values: dict[str, np.ndarray], inputs: np.ndarray) -> bool:
    """Whether `value` may be written in place: a writeable array that no other tensor or image shares."""
    if not (value.flags.writeable and value.flags.c_contiguous) or np.may_share_memory(value, inputs):
        return False
    return not any(np.may_share_memory(value, other) for other in values.values() if other is not value)


def _first_block(info: GraphInfo, block: dict[str, np.ndarray], held: list[int],
                 wanted: list[int]) -> dict[str, np.ndarray] | None:
    """The held rows of the `wanted` input positions, in order; None if one of them was not held."""
    position = {p: i for i, p in enumerate(held)}
    if not all(p in position for p in wanted):
        return None
    pick = np.array([position[p] for p in wanted], dtype=np.int64)
    in_order = np.array_equal(pick, np.arange(len(pick)))  # the usual case: the held rows are the kept ones
    first: dict[str, np.ndarray] = {}
    for name, value in block.items():
        first[name] = value if not info.per_image(name) else value[:len(pick)] if in_order else value[pick]
    return first
