"""How a faulty output row is judged: its top-1 class, and whether it is an SDC or DUE-like.

The sampled engine and the exact final-layer analysis must decide every fault
by the same rule, or their rates would not describe the same thing: NaN never
wins the argmax, a row of NaN is class −1 (so always an SDC), and a row holding
NaN or Inf is DUE-like. The rule is dtype-agnostic (widening float32 to float64
changes neither the argmax nor finiteness), so both callers share it unchanged.
"""

from __future__ import annotations

import numpy as np


def top1_class(scores: np.ndarray) -> np.ndarray:
    """Argmax per row with NaN never winning; −1 for a row that is all NaN."""
    nan = np.isnan(scores)
    cls = np.argmax(np.where(nan, -np.inf, scores), axis=1)
    cls[nan.all(axis=1)] = -1
    return cls


def nonfinite_rows(scores: np.ndarray) -> np.ndarray:
    """Rows holding NaN or ±Inf (the DUE-like outcome)."""
    return ~np.isfinite(scores).all(axis=1)


def fault_outcome(scores: np.ndarray, golden_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SDC, non-finite) per row: the top-1 differs from `golden_class`; the row holds NaN or Inf."""
    return top1_class(scores) != golden_class, nonfinite_rows(scores)
