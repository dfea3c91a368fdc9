"""Per-tensor activation ranges on a profiling set.

goldeneye's range detector and Ranger (Chen et al., 2020) both bound each
layer's activations by the largest magnitude seen on fault-free data. The
injector's `--clamp range` and the graph pass `--range-clip` use this one
function, so a model deployed with Clip nodes behaves as the campaign assumed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx

from harden.graph.batching import images_per_run
from harden.graph.ort import expose, make_session, run_batched
from harden.graph.parallel import concurrent_runs, ordered_map


# What the runs of a profiling pass going at once may hold of the tensors they expose, by default.
PROFILE_BYTES = 1 << 30


def profile_ranges(model: onnx.ModelProto, inputs: np.ndarray, tensors: Sequence[str],
                   batch: int = 128, providers: Sequence[str] = ("CPUExecutionProvider",),
                   threads: int = 0, budget: int = PROFILE_BYTES) -> dict[str, float]:
    """max |value| of each named tensor over `inputs` (model-ready float32 NCHW); `threads` (0: every CPU)
    changes speed only."""
    return profile_with_outputs(model, inputs, tensors, (), batch, providers, threads, budget=budget)[0]


def profile_with_outputs(model: onnx.ModelProto, inputs: np.ndarray, tensors: Sequence[str],
                         outputs: Sequence[str], batch: int = 128,
                         providers: Sequence[str] = ("CPUExecutionProvider",),
                         threads: int = 0, opt_level: str = "disable",
                         budget: int = PROFILE_BYTES) -> tuple[dict[str, float], list[np.ndarray]]:
    """The ranges of `tensors`, and the values of `outputs`, from one pass over `inputs` (at level 'disable'
    unless told otherwise).

    A campaign's golden scores come from the same pass as its profile when both
    use the evaluation images, which saves one run of the whole model over
    them; at level 'disable' exposing tensors changes no kernel, so the scores
    are those of the plain model bit for bit.

    Every exposed tensor of a run is alive at its end, so a run carries at most
    `batch` images, and fewer where the runs going at once would hold more than
    `budget` bytes of them: on a 224 px ResNet-50, two runs of 64 images held
    7.75 GB (tools/inject_memory.py), and `rewrite --range-clip`'s runs of 128
    on every CPU would have held that much per core. The first image runs alone
    to measure it. Neither the ranges nor the outputs depend on how the images
    are cut up (tests/fi/test_prepare.py).
    """
    batch = images_per_run(model, batch)
    names = list(dict.fromkeys(tensors))
    wanted = list(dict.fromkeys([*outputs, *names]))
    # one ORT thread per run, `threads` chunks at once: the same bits whatever the thread count
    session = make_session(expose(model, names), providers=providers, opt_level=opt_level, threads=1,
                           spinning=False)
    workers = concurrent_runs(threads)

    def chunk(x: np.ndarray) -> tuple[list[float], list[np.ndarray], int]:
        """One chunk's peaks, outputs and exposed bytes: its tensors are dropped in the worker, not queued."""
        values = dict(zip(wanted, run_batched(session, x, outputs=wanted, batch=batch)))
        held = sum(values[name].nbytes for name in names)
        return [finite_peak(values[name]) for name in names], [values[name] for name in outputs], held

    results: list[tuple[list[float], list[np.ndarray], int]] = []  # the first image, run alone
    start = 0
    if len(inputs) > 1 and batch > 1 and not isinstance(session.get_inputs()[0].shape[0], int):
        results.append(chunk(inputs[:1]))
        batch = max(1, min(batch, budget // max(results[0][2] * workers, 1)))
        start = 1
    chunks = (inputs[i:i + batch] for i in range(start, len(inputs), batch))
    peaks = dict.fromkeys(names, 0.0)
    kept: list[list[np.ndarray]] = [[] for _ in outputs]
    for chunk_peaks, chunk_outputs, _ in itertools.chain(results, ordered_map(chunk, chunks, workers)):
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
