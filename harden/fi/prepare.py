"""The evaluation set of a campaign: golden run, the paper's image filter, and range profiling.

Following the paper (and goldeneye), only images the fault-free model classifies
correctly with a strictly positive Top2Diff are used, so that an SDC is always a
change away from a correct, unambiguous answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.journal import EvalHeader
from harden.fi.nodes import NodeSessions, node_pass
from harden.fi.profile import finite_peak, profile_ranges, profile_with_outputs
from harden.graph.ort import make_session, run_batched


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
                 threads: int = 0) -> EvalSet:
    """Golden run on `inputs`, keep correct images with Top2Diff > 0, profile `tensors` on `profile_inputs`.

    The profiling set defaults to the evaluation inputs themselves; then, at
    level 'disable' or 'all', one pass gives both the golden scores and the
    ranges (exposing a tensor never changes a kernel at 'disable'; at 'all' it
    can only block a fusion, which changes no class in practice, and the
    engines that run at 'all' take each site's golden scores from their own
    fault-free runs anyway).
    """
    output = model.graph.output[0].name
    ranges: dict[str, float] | None = None
    if tensors and profile_inputs is None and opt_level in ("disable", "all"):
        ranges, (scores,) = profile_with_outputs(model, inputs, list(tensors), [output], batch, providers, threads,
                                                 opt_level)
    else:
        session = make_session(model, providers=providers, opt_level=opt_level, threads=threads, spinning=False)
        scores = run_batched(session, inputs, outputs=[output], batch=batch)[0]
    if ranges is None:
        ranges = profile_ranges(model, inputs if profile_inputs is None else profile_inputs, list(tensors),
                                batch=batch, providers=providers, threads=threads) if tensors else {}
    return select_eval(inputs, labels, scores, ranges)


def _kept(scores: np.ndarray, labels: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's filter: (kept positions, golden class, Top2Diff) of correct, finite rows with Top2Diff > 0."""
    golden = np.argmax(scores, axis=1)
    t2d = softmax_top2diff(scores, probabilities)
    keep = np.flatnonzero((golden == labels) & (t2d > 0) & np.isfinite(scores).all(axis=1))
    return keep, golden, t2d


def select_eval(inputs: np.ndarray, labels: np.ndarray, scores: np.ndarray, ranges: dict[str, float]) -> EvalSet:
    """The evaluation set of golden `scores`, after checking that they are class scores for these labels."""
    if scores.ndim != 2 or scores.shape[0] != len(inputs) or scores.shape[1] < 2:
        raise HardenError(f"model output has shape {list(scores.shape)}; expected class scores N×C with C ≥ 2")
    if labels.max(initial=0) >= scores.shape[1]:
        raise HardenError(f"labels go up to {int(labels.max())} but the model scores {scores.shape[1]} classes")
    probabilities = are_probabilities(scores)
    keep, golden, t2d = _kept(scores, labels, probabilities)
    correct = int((golden == labels).sum())
    if len(keep) == 0:
        raise HardenError(f"no evaluation image is classified correctly (accuracy {correct / len(labels):.1%}); "
                          "check the data and preprocessing")
    return EvalSet(np.ascontiguousarray(inputs[keep]), labels[keep].astype(np.int64), keep, golden[keep],
                   t2d[keep], ranges, int(len(inputs)), correct, probabilities)


def prepare_eval_nodes(sessions: NodeSessions, inputs: np.ndarray, labels: np.ndarray, tensors: Sequence[str],
                       batch: int, keep: set[str], block_images: int) -> tuple[EvalSet, dict[str, np.ndarray] | None]:
    """prepare_eval through the cone engine's node-by-node sessions, also returning the first cache block.

    The cone needs every tensor of a node-by-node run of each block anyway, so
    this one pass gives the golden scores, the ranges of `tensors` and the
    tensors in `keep` of the first `block_images` kept images: the campaign
    then runs each image through the model once instead of twice. The block is
    None in the rare case it cannot be told in one pass (a row with distinct
    top scores whose softmax Top2Diff rounds to 0 came before the block filled).
    """
    info = sessions.info
    peaks = dict.fromkeys(tensors, 0.0)
    scores: list[np.ndarray] = []
    block: dict[str, np.ndarray] = {}
    held: list[int] = []  # positions of the rows in `block`: correct, finite, with distinct top two scores
    for start, values in node_pass(sessions, inputs, batch, keep | set(tensors)):
        chunk = values[info.scores]
        scores.append(chunk)
        for name in tensors:
            peaks[name] = max(peaks[name], finite_peak(values[name]))
        if len(held) >= block_images or chunk.ndim != 2 or chunk.shape[1] < 2:
            continue
        top = np.sort(chunk, axis=1)[:, -2:]
        rows = np.flatnonzero((np.argmax(chunk, axis=1) == labels[start:start + len(chunk)])
                              & np.isfinite(chunk).all(axis=1) & (top[:, 1] > top[:, 0]))[:block_images - len(held)]
        for name in keep | {info.scores}:
            value = values[name]
            if not info.per_image(name):  # shape arithmetic: the same for every chunk
                block.setdefault(name, value)
                continue
            if name not in block:
                block[name] = np.empty((block_images, *value.shape[1:]), dtype=value.dtype)
            block[name][len(held):len(held) + len(rows)] = value[rows]
        held.extend((start + rows).tolist())
    ev = select_eval(inputs, labels, np.concatenate(scores), peaks)
    position = {p: i for i, p in enumerate(held)}
    wanted = [int(p) for p in ev.ids[:block_images]]
    if not all(p in position for p in wanted):
        return ev, None
    pick = np.array([position[p] for p in wanted], dtype=np.int64)
    in_order = np.array_equal(pick, np.arange(len(pick)))  # the usual case: the held rows are the kept ones
    first: dict[str, np.ndarray] = {}
    for name, value in block.items():
        first[name] = value if not info.per_image(name) else value[:len(pick)] if in_order else value[pick]
    return ev, first
