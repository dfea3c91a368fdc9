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

from harden.graph.ort import expose, make_session, run_batched


def profile_ranges(model: onnx.ModelProto, inputs: np.ndarray, tensors: Sequence[str],
                   batch: int = 128, providers: Sequence[str] = ("CPUExecutionProvider",)) -> dict[str, float]:
    """max |value| of each named tensor over `inputs` (model-ready float32 NCHW)."""
    names = list(dict.fromkeys(tensors))
    session = make_session(expose(model, names), providers=providers, opt_level="disable")
    peaks = dict.fromkeys(names, 0.0)
    for start in range(0, len(inputs), batch):
        values = run_batched(session, inputs[start:start + batch], outputs=names, batch=batch)
        for name, value in zip(names, values):
            finite = value[np.isfinite(value)]
            if finite.size:
                peaks[name] = max(peaks[name], float(np.max(np.abs(finite))))
    return peaks


def clamp_to_range(values: np.ndarray, peak: float) -> np.ndarray:
    """goldeneye-style range restriction: NaN → 0, ±Inf and out-of-range → ±peak."""
    out = np.nan_to_num(values, nan=0.0, posinf=peak, neginf=-peak)
    return np.clip(out, -peak, peak).astype(values.dtype, copy=False)
