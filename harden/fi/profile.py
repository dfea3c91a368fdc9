"""Per-tensor activation ranges on a profiling set.

goldeneye's range detector and Ranger (Chen et al., 2020) both bound each
layer's activations by the largest magnitude seen on fault-free data. The
injector's `--clamp range` and the graph pass `--range-clip` use this one
function, so a model deployed with Clip nodes behaves as the campaign assumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from harden.graph.batching import images_per_run
from harden.graph.ort import expose, make_session, run_batched
from harden.graph.parallel import concurrent_runs, ordered_map


def profile_ranges(model: onnx.ModelProto, inputs: np.ndarray, tensors: Sequence[str],
                   batch: int = 128, providers: Sequence[str] = ("CPUExecutionProvider",),
                   threads: int = 0) -> dict[str, float]:
    """max |value| of each named tensor over `inputs` (model-ready float32 NCHW); `threads` (0: every CPU)
    changes speed only."""
    return profile_with_outputs(model, inputs, tensors, (), batch, providers, threads)[0]


def profile_with_outputs(model: onnx.ModelProto, inputs: np.ndarray, tensors: Sequence[str],
                         outputs: Sequence[str], batch: int = 128,
                         providers: Sequence[str] = ("CPUExecutionProvider",),
                         threads: int = 0, opt_level: str = "disable") -> tuple[dict[str, float], list[np.ndarray]]:
    """The ranges of `tensors`, and the values of `outputs`, from one pass over `inputs` (at level 'disable'
    unless told otherwise).

    A campaign's golden scores come from the same pass as its profile when both
    use the evaluation images, which saves one run of the whole model over
    them; at level 'disable' exposing tensors changes no kernel, so the scores
    are those of the plain model bit for bit.
    """
    batch = images_per_run(model, batch)
    names = list(dict.fromkeys(tensors))
    wanted = list(dict.fromkeys([*outputs, *names]))
    # one ORT thread per run, `threads` chunks at once: the same bits whatever the thread count
    session = make_session(expose(model, names), providers=providers, opt_level=opt_level, threads=1,
                           spinning=False)

    def chunk(x: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
        """One chunk's peaks and outputs: its exposed tensors are dropped in the worker, not held in a queue."""
        values = dict(zip(wanted, run_batched(session, x, outputs=wanted, batch=batch)))
        return [finite_peak(values[name]) for name in names], [values[name] for name in outputs]

    peaks = dict.fromkeys(names, 0.0)
    kept: list[list[np.ndarray]] = [[] for _ in outputs]
    chunks = (inputs[start:start + batch] for start in range(0, len(inputs), batch))
    for chunk_peaks, chunk_outputs in ordered_map(chunk, chunks, concurrent_runs(threads)):
        for acc, value in zip(kept, chunk_outputs):
            acc.append(value)
        for name, peak in zip(names, chunk_peaks):
            peaks[name] = max(peaks[name], peak)
    return peaks, [np.concatenate(acc) for acc in kept]


def finite_peak(value: np.ndarray) -> float:
    """max |v| over the finite elements (0 if none); two reductions and no copy in the usual all-finite case."""
    if not value.size:
        return 0.0
    hi, lo = float(value.max()), float(value.min())
    if np.isfinite(hi) and np.isfinite(lo):
        return max(hi, -lo)
    finite = value[np.isfinite(value)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def clamp_to_range(values: np.ndarray, peak: float) -> np.ndarray:
    """goldeneye-style range restriction: NaN → 0, ±Inf and out-of-range → ±peak."""
    out = np.nan_to_num(values, nan=0.0, posinf=peak, neginf=-peak)
    return np.clip(out, -peak, peak).astype(values.dtype, copy=False)
