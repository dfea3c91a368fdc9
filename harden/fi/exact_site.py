"""One fault site of a final classifier, described so that every flip in it has a closed form.

A single flip in the final layer moves the pre-argmax scores of image n along
one direction: S' = S_n + Δ · v_g, where v_g (a C-vector) depends on which
element was hit and Δ (a scalar) on the element, the bit and the image. The
head classes in `exact_head` describe each site by those pieces; `exact`
turns them into exact SDC counts without ever materialising a faulty forward
pass, except for the few faults whose float32 evaluation could differ from the
real-arithmetic closed form (non-finite values, overflow risk, or a margin
within float32 rounding of a tie), which `recompute` evaluates in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from harden.errors import HardenError
from harden.fi.bitflip import flip, peak_scale
from harden.fi.profile import clamp_to_range

# Half an ulp of 1.0 in float32: the unit roundoff of every float32 operation.
U32 = float(np.finfo(np.float32).eps) / 2


POLICIES = ("none", "range", "range-output")


@dataclass(frozen=True)
class RangePolicy:
    """How faulty values are range-restricted, and the profiled activation peaks.

    - `none`: faulty values pass through.
    - `range`: the engine's `--clamp range` (goldeneye's range detector): the faulty
      value alone is clamped with clamp_to_range, to ± the profiled peak of its
      activation tensor, or ± max|W| of its weight tensor.
    - `range-output`: what deployed Clip nodes do: the faulted tensor as a whole is
      clamped to its profiled peak; for a weight fault, the output of the layer the
      weight feeds.

    `peaks` also sets the int8 scale of an activation (peak / 127), as in the engine.
    """

    name: str = "none"
    peaks: dict[str, float] = field(default_factory=dict)
    # tensors the model itself range-clips (harden rewrite --range-clip), with their bounds: every policy
    # sees those clamps, as the graph applies them whatever the injector does
    clips: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise HardenError(f"unknown range policy {self.name!r}; use one of {', '.join(POLICIES)}")

    def _peak(self, tensor: str) -> float:
        if tensor not in self.peaks:
            raise HardenError(f"no profiled range for tensor {tensor!r}")
        return float(self.peaks[tensor])

    def tensor_peak(self, tensor: str) -> float | None:
        """The clamp applied to the whole tensor (range-output, or a clip in the graph)."""
        return _tighter(self._peak(tensor) if self.name == "range-output" else None, self.clips.get(tensor))

    def element_peak(self, tensor: str) -> float | None:
        """The clamp applied to a faulty activation value (clamping to p, then to q, clamps to min(p, q))."""
        return _tighter(None if self.name == "none" else self._peak(tensor), self.clips.get(tensor))

    def weight_peak(self, values: np.ndarray) -> float | None:
        """The clamp applied to a faulty weight value (range only)."""
        return float(np.max(np.abs(values))) if self.name == "range" and values.size else None

    def act_scale(self, tensor: str, fmt: str) -> float:
        """The scale an activation tensor is stored with in `fmt` (int8, fp8), from its profiled peak, as the
        engine stores it."""
        return peak_scale(float(self.peaks.get(tensor, 0.0)), fmt)


def _tighter(a: float | None, b: float | None) -> float | None:
    """The tighter of two optional clamps."""
    return b if a is None else a if b is None else min(a, b)


@dataclass
class Site:
    """A tensor whose every element × bit × image the exact analysis enumerates.

    `base` (N×C, float64) is the scores of the fault-free run with this site's
    clamp applied; argmax of base + Δ·directions[group[k]] is the faulty top-1.
    `tau` (N) bounds the float32 rounding error of a fault-free score and
    `delta(rows, ks, bit)` returns Δ (len(rows)×len(ks)) with `slack`, the extra rounding
    error the fault itself brings; `limit`[k] is the largest |Δ| for which no
    float32 overflow can occur. Weight sites, where Δ = δ(k, bit)·x[n, col[k]],
    also give `weight_delta` and `x_abs`, so that flips too small to matter for
    any image are counted without evaluating them image by image; `kappa`[g]
    bounds slack/|δ·x| for such sites. Sites before an L2 normalisation give
    `zmax(rows, ks, Δ)`, lower and upper bounds on max|z'|, which decide float32
    overflow of ‖z'‖ in closed form (see `exact.overflow_outcome`).

    A site whose every fault moves one class's score alone (directions = identity:
    classifier weights and biases) gives `scores`, the fault-free float32 scores
    in base's units. The other classes then keep those exact values, so a fault
    is decided by comparing one faulty score with exact rivals (see
    `exact.unit_geometry`), which also decides images whose own margin is within
    rounding of a tie. `units` (N) is how many of base's units one logit is worth
    in the fault-free run (1 when None) and `units_slope` (G) bounds how fast a
    fault of size |Δ| can grow that (0 when None): a Softmax tie band is set in
    logits, so `after_softmax` converts it with these. `tie` (N) is that band in
    base's units, once set, and `post` names the (Log)Softmax applied to the
    scores. `reach` (N×C), given with `scores`, bounds Σ|terms| of each score's
    dot product: with it, a fault whose score surely stays finite, or surely
    overflows to ±Inf, is decided in closed form (`exact.overflow_split`).
    `clip_free(rows, ks, Δ)`, for a site whose scores the graph range-clips
    downstream of a closed form that ignores the clip, marks the faults the
    clip surely leaves alone; float32 decides the rest; `clip_radius` (N×G),
    the |Δ| below which it does, lets weight flips be pruned. `nan_to_zero`: a range
    clip on the cosines turns the NaN scores of an overflowing z' into zeros.
    """

    tensor: str
    role: str
    layer: str
    size: int
    base: np.ndarray
    tau: np.ndarray
    directions: np.ndarray
    group: np.ndarray
    limit: np.ndarray
    delta: Callable[[slice, np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    recompute: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    classes: np.ndarray | None = None
    zmax: Callable[[slice, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    weight_delta: Callable[[np.ndarray, int], np.ndarray] | None = None
    x_abs: np.ndarray | None = None
    col: np.ndarray | None = None
    kappa: np.ndarray | None = None
    scores: np.ndarray | None = None
    units: np.ndarray | None = None
    units_slope: np.ndarray | None = None
    tie: np.ndarray | None = None
    post: str = ""
    reach: np.ndarray | None = None
    clip_free: Callable[[slice, np.ndarray, np.ndarray], np.ndarray] | None = None
    clip_radius: np.ndarray | None = None
    nan_to_zero: bool = False


# Logits closer than this to a tie are left to the float32 path when the model outputs Softmax probabilities.
# Two logits d apart become probabilities in the ratio exp(d) (the subtraction of the max is exact near a
# tie), so they keep their order when the Softmax is within d/2, relative, of the exact one.
# tests/fi/test_exact_onnx.py holds ONNX Runtime's to 1e-5 / 4 on logits from 0.1 to 1000 in scale.
SOFTMAX_TIE = 1e-5


def softmax32(logits: np.ndarray, log: bool = False) -> np.ndarray:
    """Softmax (or LogSoftmax) over the classes in float32, as the model computes it: NaN or +Inf in a row
    gives NaN."""
    z = np.asarray(logits, dtype=np.float32)
    with np.errstate(all="ignore"):
        shifted = z - z.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        total = e.sum(axis=1, keepdims=True)
        return shifted - np.log(total) if log else e / total


def after_softmax(site: Site, log: bool = False, band: float = SOFTMAX_TIE) -> Site:
    """The site of a model that outputs Softmax(scores), or LogSoftmax with `log`: the faulty top-1 is the
    scores' own, except within `band` of a tie, where the float32 path decides, and that path applies
    the (Log)Softmax too. LogSoftmax subtracts one log-sum from every shifted score, which near a tie
    (log-sum ≤ log C) rounds by far less than the band.

    The band is in logits; a site whose base is in other units (cosines, or z·W before an L2
    normalisation, which a fault in z rescales) carries it in its own through `units` and `units_slope`.
    A float16 graph rounds the (Log)Softmax's output to float16, which needs a wider band
    (harden.fi.exact_half.softmax_band).
    """
    inner_recompute, inner_delta = site.recompute, site.delta

    def recompute(rows: np.ndarray, ks: np.ndarray, bit: int) -> np.ndarray:
        return softmax32(inner_recompute(rows, ks, bit), log)

    tie = band * (np.ones(len(site.tau)) if site.units is None else site.units)
    if site.units_slope is None:
        delta, kappa = inner_delta, site.kappa
    else:
        slope = band / 2 * site.units_slope

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            change, slack = inner_delta(rows, ks, bit)
            with np.errstate(invalid="ignore", over="ignore"):
                return change, slack + slope[site.group[ks]] * np.abs(change)

        kappa = None if site.kappa is None else site.kappa + slope
    # the envelope's decisions compare margins with 2·(tau + slack), which now holds the band once at the
    # fault-free units and once for what the fault adds; exact.unit_geometry adds tie / 2 back
    return replace(site, tau=site.tau + tie / 2, tie=tie, delta=delta, kappa=kappa, recompute=recompute,
                   post="LogSoftmax" if log else "Softmax")


def clamp64(values: np.ndarray, peak: float | None) -> np.ndarray:
    """The range policy in float64: identity without a peak, else clamp_to_range."""
    if peak is None:
        return values
    with np.errstate(invalid="ignore"):
        return clamp_to_range(values, peak)


def clamp32(values: np.ndarray, peak: float | None) -> np.ndarray:
    """The range policy on float32 values, as the injected graph applies it."""
    values = np.asarray(values, dtype=np.float32)
    if peak is None:
        return values
    with np.errstate(invalid="ignore"):
        return clamp_to_range(values, float(np.float32(peak)))


def dot_error(weights_abs: np.ndarray, values_abs: np.ndarray, length: int) -> np.ndarray:
    """Worst-case float32 rounding of a length-K dot product per row: (K+2)·u·Σ|w||x|, max over classes."""
    return (length + 2) * U32 * np.max(values_abs @ weights_abs.T, axis=1)


def flip_bit(values: np.ndarray, bit: int, fmt: str, scale: float = 1.0, peak: float | None = None) -> np.ndarray:
    """`values` (any shape, float32) with `bit` flipped in `fmt`, then clamped to ±`peak` if given."""
    values = np.asarray(values, dtype=np.float32)
    flat = values.ravel()
    return clamp32(flip(flat, np.full(flat.size, bit), fmt, scale).reshape(values.shape), peak)


def flip_delta(values: np.ndarray, fmt: str, scale: float = 1.0,
               peak: float | None = None) -> Callable[[np.ndarray, int], np.ndarray]:
    """δ(ks, bit): the float64 change that flipping `bit` makes to elements `ks` of a (flattened) weight tensor.

    Every weight site's closed form and its pruning radius start from this one quantity.
    """
    flat = np.asarray(values, dtype=np.float32).ravel()

    def delta(ks: np.ndarray, bit: int) -> np.ndarray:
        with np.errstate(all="ignore"):
            return flip_bit(flat[ks], bit, fmt, scale, peak).astype(np.float64) - flat[ks]

    return delta


def weight_change(raw_base: np.ndarray, clamped_base: np.ndarray, change: np.ndarray, peak: float | None,
                  tau: np.ndarray, kappa: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Δ and its rounding slack when one output element moves by `change` (N×K) before the range policy.

    Under clamping, an output driven clearly past the peak (or to ±Inf, or to NaN
    that the policy maps to 0) lands exactly on its clamped value, so the fault
    adds no rounding beyond the clamped value's own.
    """
    with np.errstate(all="ignore"):
        if peak is None:
            return change, kappa * np.abs(change)
        raw = raw_base + change
        new = clamp64(raw, peak)
        delta = new - clamped_base
        clear = ~np.isfinite(raw) | (np.abs(raw) - peak > 2 * (tau[:, None] + kappa * np.abs(change)))
        slack = kappa * np.abs(delta) + np.where(clear, 0.0, kappa * np.abs(change))
        return delta, slack


def activation_change(golden: np.ndarray, base: np.ndarray, bit: int, fmt: str, peak: float | None,
                      scale: float) -> np.ndarray:
    """Δ (float64) when activation values (N×K, golden float32) are flipped and clamped to ±`peak`;
    `base` is the fault-free tensor as the faulty run sees it."""
    new = flip_bit(golden, bit, fmt, scale, peak)
    with np.errstate(all="ignore"):
        return new.astype(np.float64) - base.astype(np.float64)
