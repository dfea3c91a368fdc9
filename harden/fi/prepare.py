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
from harden.fi.profile import profile_ranges, profile_with_outputs
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
    if scores.ndim != 2 or scores.shape[0] != len(inputs) or scores.shape[1] < 2:
        raise HardenError(f"model output has shape {list(scores.shape)}; expected class scores N×C with C ≥ 2")
    if labels.max(initial=0) >= scores.shape[1]:
        raise HardenError(f"labels go up to {int(labels.max())} but the model scores {scores.shape[1]} classes")
    golden = np.argmax(scores, axis=1)
    probabilities = are_probabilities(scores)
    t2d = softmax_top2diff(scores, probabilities)
    correct = golden == labels
    keep = np.flatnonzero(correct & (t2d > 0) & np.isfinite(scores).all(axis=1))
    if len(keep) == 0:
        raise HardenError(f"no evaluation image is classified correctly (accuracy {correct.mean():.1%}); "
                          "check the data and preprocessing")
    if ranges is None:
        ranges = profile_ranges(model, inputs if profile_inputs is None else profile_inputs, list(tensors),
                                batch=batch, providers=providers, threads=threads) if tensors else {}
    return EvalSet(np.ascontiguousarray(inputs[keep]), labels[keep].astype(np.int64), keep, golden[keep],
                   t2d[keep], ranges, int(len(inputs)), int(correct.sum()), probabilities)
