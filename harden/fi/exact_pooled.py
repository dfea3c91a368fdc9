"""Fault sites of a classifier that scores a feature map: 1×1 Conv → ReLU → GlobalAveragePool (SqueezeNet).

Score k of image n is the mean over the map's P positions of relu(y[k, p]), where y = W·x + b is the 1×1
convolution of the d-channel map x. A flip in W[k, c], in b[k] or in one stored y[k, p] changes channel k
alone, so it moves score k alone and every other class keeps its exact fault-free float32 score: each fault
is one faulty score against exact rivals (exact.unit_geometry), as for a Gemm's weights.

The ReLU makes that score piecewise linear in the flip, so there is no line to intersect. A weight or bias
flip is first bracketed in O(1) from per-channel sums of x (`_bracket`); only the faults whose bracket comes
near a decision edge pay the P multiply-adds of the exact value (`_exact`). Both carry rigorous float32
rounding bounds: the Conv's dot products (γ = (d+2)u of Σ|W||x|) and the pool's sum ((P+3)u of Σ relu).

Overflow is decided in closed form where it is sure: a faulty term past FLT_MAX at some position makes that
position +Inf, and the ReLU and the pool keep it, so the score is +Inf; a NaN weight makes the score NaN.
Such scores are handed to the analysis as Δ beyond INF_EDGE with the site's `reach` at zero
(exact.overflow_split); a NaN score never wins the argmax, so it counts as −Inf, or as +Inf behind a Softmax,
whose row it turns into NaN. What float32 may or may not overflow is recomputed. Behind harden's range
clip on the Conv's output (`rewrite --range-clip`: NaN → 0, then ± its bound) nothing overflows, and a
weight or bias flip is bracketed from the clip's range and, near an edge, position by position between the
clipped ends of each faulty value's rounding interval (`_capped_delta`, `_interval`). Recomputation runs ONNX
Runtime's own nodes as the graph has them, never numpy: the nodes after the Conv on the faulty channel
alone for a stored-output fault (the pool's sum over one channel is the same whatever the other channels),
the Conv and every node after it with the flipped weight fed in for a weight or bias fault.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.bitflip import tensor_scale
from harden.fi.exact import FINITE_EDGE, INF_EDGE, unit_edges
from harden.fi.exact_site import SOFTMAX_TIE, U32, RangePolicy, Site, clamp64, flip_bit, flip_delta
from harden.fi.pooled_tail import TailRunner

# A score Δ this far out stands for a score of ±Inf (exact.overflow_split, with `reach` zero).
INF_SCORE = 1e300
# Pairs of (image, fault) per exact evaluation: bounds each P-wide working array to a few tens of MB.
EXACT_CELLS = 1 << 21
# Relative guard on the overflow thresholds, far above the rounding of a dot product or a pool's sum.
GUARD = 1e-4


@dataclass
class PooledConvHead:
    """A 1×1 Conv over a feature map, then ReLU (`relu`) and GlobalAveragePool, with the ONNX names of its
    tensors: `input` the map it reads, `output` the Conv's output (the injector's activation site), `pooled`
    the pool's output (the scores, before any Softmax)."""

    weight: np.ndarray
    bias: np.ndarray | None
    input: str
    output: str
    pooled: str
    weight_name: str
    bias_name: str | None
    layer: str
    relu: bool
    # the Conv and the nodes after it up to the pool, and the constants those read (a range clip's bounds)
    nodes: list[onnx.NodeProto]
    constants: dict[str, np.ndarray]
    opset: int

    kind = "pooled-conv"
    transposed: tuple[str, ...] = ()
    softmax: str = ""
    clips: dict[str, float] = field(default_factory=dict)

    def sites(self, values: dict[str, np.ndarray], top1: np.ndarray, fmt: str, policy: RangePolicy,
              providers: Sequence[str] = ("CPUExecutionProvider",)) -> list[Site]:
        """Weight, bias and output sites, from the golden map, Conv output and scores in `values`."""
        return _PooledSites(self, values, top1, fmt, policy, providers).all()


class _PooledSites:
    """The float64 summaries of one head and data set, and the sites built from them."""

    def __init__(self, head: PooledConvHead, values: dict[str, np.ndarray], top1: np.ndarray, fmt: str,
                 policy: RangePolicy, providers: Sequence[str]) -> None:
        if policy.name == "range-output" or set(policy.clips) - {head.output}:
            raise HardenError("exact analysis: a Conv → ReLU → pool classifier is analysed under --clamp none or "
                              "range; range-output clamps, and range clips in the graph other than on the "
                              "classifier's output, are not covered")
        # harden's range clip on the Conv's output: NaN → 0, then ± cap; every score then stays finite
        self.cap = policy.clips.get(head.output)
        self.h, self.fmt, self.policy = head, fmt, policy
        self.tail = TailRunner(head, values[head.output].shape[2:], providers)
        n = len(top1)
        self.W = np.ascontiguousarray(head.weight, np.float32)
        self.C, self.d = self.W.shape
        self.b = np.zeros(self.C, np.float32) if head.bias is None else np.asarray(head.bias, np.float32)
        self.x = np.ascontiguousarray(values[head.input], np.float32).reshape(n, self.d, -1)
        self.y = np.ascontiguousarray(values[head.output], np.float32).reshape(n, self.C, -1)
        self.P = self.y.shape[2]
        if self.x.shape[2] != self.P:
            raise HardenError(f"exact analysis: Conv {head.layer!r} maps {self.x.shape[2]} positions to {self.P}")
        self.S = np.asarray(values[head.pooled], np.float32).reshape(n, self.C)
        self.top1 = np.asarray(top1)
        r = self._act(self.y.astype(np.float64))
        self.base = r.sum(axis=2) / self.P  # the real mean of the golden rectified values
        self.base_abs = np.abs(r).sum(axis=2) / self.P
        self.y_abs = np.abs(self.y).astype(np.float64).sum(axis=2) / self.P
        self.gamma = (self.d + 2) * U32  # a dot product's rounding, relative to Σ|terms|
        self.pool = (self.P + 3) * U32  # the pool's sum and division, relative to Σ|values|
        self.a_mean, self.a_max = self._term_sums()
        self.tau_w = np.max(2 * self.gamma * self.a_mean + self.pool * (self.base_abs + 2 * self.gamma * self.a_mean),
                            axis=1)
        x64 = self.x.astype(np.float64)
        self.x_abs = np.abs(x64).sum(axis=2) / self.P
        self.x_pos = np.maximum(x64, 0).sum(axis=2) / self.P
        self.x_neg = np.maximum(-x64, 0).sum(axis=2) / self.P
        self.x_hi, self.x_lo = x64.max(axis=2), x64.min(axis=2)
        self.x_zero = (self.x == 0).any(axis=2)
        # the decision edges of the faulty score, as exact.unit_geometry draws them
        self.lo, self.hi, _, _ = unit_edges(self.S.astype(np.float64), self.base, self.top1)
        self.eye = np.eye(self.C)

    def _act(self, values: np.ndarray) -> np.ndarray:
        """What the tail makes of Conv outputs before the pool: the range clip, if any, then the ReLU."""
        values = clamp64(values, self.cap)
        return np.maximum(values, 0) if self.h.relu else values

    def _term_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and max over positions of Σ_c |W[k, c] x[c, p]| + |b[k]| (N×C each): what bounds the rounding
        of every Conv output, and the terms a faulty one is added to."""
        w_abs, b_abs = np.abs(self.W).astype(np.float64), np.abs(self.b).astype(np.float64)[:, None]
        mean, peak = np.empty((len(self.x), self.C)), np.empty((len(self.x), self.C))
        for i, image in enumerate(self.x):
            a = w_abs @ np.abs(image).astype(np.float64) + b_abs
            mean[i], peak[i] = a.mean(axis=1), a.max(axis=1)
        return mean, peak

    def all(self) -> list[Site]:
        sites = [self.weight_site()]
        if self.h.bias is not None and self.h.bias_name is not None:
            sites.append(self.bias_site())
        return sites + [self.output_site()]

    # -- weight and bias: one channel's Conv output moves by δ·x[c] (by δ for the bias) --------------------

    def _channel_site(self, tensor: str, role: str, values: np.ndarray, col: np.ndarray | None) -> Site:
        """A site whose element e changes channel k[e] by δ·x[col[e]] (δ alone where `col` is None)."""
        flat = values.ravel()
        scale, vpeak = tensor_scale(values, self.fmt), self.policy.weight_peak(values)
        delta_of = flip_delta(values, self.fmt, scale, vpeak)
        classes = np.arange(flat.size) // (self.d if col is not None else 1)
        kappa = self.gamma + self.pool * (2 + self.gamma)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            with np.errstate(all="ignore"):
                new = flip_bit(flat[ks], bit, self.fmt, scale, vpeak).astype(np.float64)
                dw = new - flat[ks]
            return self._channel_delta(rows, classes[ks], None if col is None else col[ks], new, dw)

        def recompute(n: np.ndarray, ks: np.ndarray, bit: int) -> np.ndarray:
            out = np.empty((len(n), self.C), np.float32)
            for m, (i, e) in enumerate(zip(n, ks)):
                faulty = flat.copy()
                faulty[e] = flip_bit(flat[e:e + 1], bit, self.fmt, scale, vpeak)[0]
                w, b = (faulty.reshape(self.W.shape), self.b) if col is not None else (self.W, faulty)
                out[m] = self.tail.scores(self.x[i], w, b)
            return out

        x_abs = self.x_abs if col is not None else np.ones((len(self.x), 1))
        return Site(tensor, role, self.h.layer, flat.size, self.base, self.tau_w, self.eye, classes,
                    np.full(flat.size, np.inf), delta, recompute, classes=classes,
                    weight_delta=delta_of if col is not None else None, x_abs=x_abs,
                    col=col if col is not None else np.zeros(flat.size, np.int64),
                    kappa=np.full(self.C, kappa), scores=self.S.astype(np.float64),
                    reach=np.zeros((len(self.x), self.C)))

    def weight_site(self) -> Site:
        cols = np.arange(self.W.size) % self.d
        return self._channel_site(self.h.weight_name, "weight", self.W, cols)

    def bias_site(self) -> Site:
        return self._channel_site(str(self.h.bias_name), "bias", self.b, None)

    def _channel_x(self, rows: slice, col: np.ndarray | None, k: int) -> tuple[np.ndarray, ...]:
        """(mean relu(x), mean relu(−x), max x, min x, any x == 0) of the channels a fault scales (R×K)."""
        if col is None:
            shape = (len(self.x[rows]), k)
            return np.ones(shape), np.zeros(shape), np.ones(shape), np.ones(shape), np.zeros(shape, bool)
        return (self.x_pos[rows][:, col], self.x_neg[rows][:, col], self.x_hi[rows][:, col],
                self.x_lo[rows][:, col], self.x_zero[rows][:, col])

    def _channel_delta(self, rows: slice, k: np.ndarray, col: np.ndarray | None, new: np.ndarray,
                       dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δ of score k and its rounding slack (R×K), when channel k's Conv output moves by dw·x[col].

        Overflow first: a sure +Inf or a NaN score becomes a Δ of ±INF_SCORE, an unsure one NaN (recomputed).
        The rest is bracketed, and evaluated exactly where the bracket does not settle the fault.
        """
        pos, neg, hi, lo, zero = self._channel_x(rows, col, len(k))
        w = np.broadcast_to(new, pos.shape)
        if self.cap is not None:
            return self._capped_delta(rows, k, col, w, np.broadcast_to(dw, pos.shape), pos, neg)
        a_max = self.a_max[rows][:, k]
        with np.errstate(all="ignore"):
            top = np.where(w > 0, w * hi, w * lo)  # the largest faulty term over the positions
            bottom = np.where(w > 0, w * lo, w * hi)
            low, high = self._bracket(rows, k, np.broadcast_to(dw, pos.shape), pos, neg)
            # a term past FLT_MAX makes its position +Inf; a sum of the rectified positions past it, the score
            sure_inf = (top - a_max * (1 + GUARD) > INF_EDGE) | (self.h.relu & (self.P * low > INF_EDGE))
            reach = np.maximum(top, 0) if self.h.relu else np.maximum(np.abs(top), np.abs(bottom))
            finite = ((reach + a_max) * (1 + GUARD) < FINITE_EDGE) & (self.P * np.abs(high) * (1 + GUARD) < FINITE_EDGE)
            if not self.h.relu:
                finite &= self.P * np.abs(low) * (1 + GUARD) < FINITE_EDGE
            base = self.base[rows][:, k]
            delta, slack = (high + low) / 2 - base, (high - low) / 2
        undecided = finite & np.isfinite(w) & ~self._settled(rows, k, delta, slack)
        if undecided.any():
            r, m = np.nonzero(undecided)
            delta[r, m], slack[r, m] = self._exact(rows.start + r, k[m], None if col is None else col[m], dw[m])
        return self._overflow(w, hi, lo, zero, sure_inf, finite, self.base[rows][:, k], delta, slack)

    def _capped_delta(self, rows: slice, k: np.ndarray, col: np.ndarray | None, w: np.ndarray, dw: np.ndarray,
                      pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_channel_delta` behind a range clip, which maps every value into [−cap, cap] and NaN to 0: no score
        overflows. The clip and the ReLU are monotone and 1-Lipschitz, so the change of a position lies
        between −relu(−t) and relu(t), and the score within the clip's range. A NaN weight makes every
        position NaN, so 0: the score is exactly 0. An infinite one is rerun (Inf × 0 is NaN, so 0)."""
        base, a, g = self.base[rows][:, k], 2 * self.gamma * self.a_mean[rows][:, k], self.gamma
        with np.errstate(all="ignore"):
            up = np.where(dw > 0, dw * pos, -dw * neg)  # mean relu(t)
            down = np.where(dw > 0, dw * neg, -dw * pos)  # mean relu(−t)
            floor = 0.0 if self.h.relu else -self.cap
            high = np.minimum(base + a + (1 + g) * up, self.cap)
            low = np.maximum(base - a - (1 + g) * down, floor)
            spread = self.pool * np.maximum(np.abs(high), np.abs(low))
            delta, slack = (high + low) / 2 - base, (high - low) / 2 + spread
        undecided = np.isfinite(w) & ~self._settled(rows, k, delta, slack)
        if undecided.any():
            r, m = np.nonzero(undecided)
            delta[r, m], slack[r, m] = self._interval(rows.start + r, k[m], None if col is None else col[m],
                                                      dw[r, m])
        delta = np.select([np.isnan(w), np.isinf(w)], [-base, np.nan], delta)
        return delta, np.where(np.isnan(w), 0.0, slack)

    def _interval(self, n: np.ndarray, k: np.ndarray, col: np.ndarray | None,
                  dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δ and its slack for the pairs (image n[i], fault of class k[i], δ dw[i]) behind a range clip: each
        position's faulty Conv output lies within 2γ Σ|terms| + γ|t| of y + t (or is ±Inf beyond it, which the
        clip maps as it maps the far end), and the clip and the ReLU are monotone."""
        out, err = np.empty(len(n)), np.empty(len(n))
        for i, y, t in self._positions(n, k, col, dw):
            z = y + t
            e = 2 * self.gamma * self.a_max[n[i], k[i], None] + self.gamma * np.abs(t)
            low, high = self._act(z - e), self._act(z + e)
            mean_low, mean_high = low.mean(axis=1), high.mean(axis=1)
            spread = self.pool * np.maximum(np.abs(low), np.abs(high)).mean(axis=1)
            out[i] = (mean_low + mean_high) / 2 - self.base[n[i], k[i]]
            err[i] = (mean_high - mean_low) / 2 + spread
        return out, err

    def _overflow(self, w: np.ndarray, hi: np.ndarray, lo: np.ndarray, zero: np.ndarray, sure_inf: np.ndarray,
                  finite: np.ndarray, base: np.ndarray, delta: np.ndarray,
                  slack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δ and slack where the faulty weight is not finite or float32 overflows: ±INF_SCORE for a score that
        is surely +Inf or NaN, NaN (recomputed) where unsure; unchanged elsewhere."""
        nonfinite_w = ~np.isfinite(w)
        if not self.h.relu:  # −Inf and +Inf terms may meet: float32 decides every overflow
            return np.where(~finite | nonfinite_w, np.nan, delta), slack
        infinite_w = np.isinf(w) & ~zero  # ±Inf times a map with no zero: every term is ±Inf
        silent = infinite_w & (np.where(w > 0, hi, -lo) <= 0)  # every term −Inf: the ReLU zeroes the channel
        nan_score = INF_SCORE if self.h.softmax else -INF_SCORE  # NaN never wins; behind a Softmax, a NaN row
        delta = np.select([nonfinite_w & ~infinite_w, silent, sure_inf | infinite_w, ~finite],
                          [nan_score, -base, INF_SCORE, np.nan], delta)
        return delta, np.where(silent | sure_inf | infinite_w, 0.0, slack)

    def _bracket(self, rows: slice, k: np.ndarray, dw: np.ndarray, pos: np.ndarray,
                 neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): an interval that holds the computed faulty score (R×K), while it stays finite.

        With t = δ·x: relu(y + t) − relu(y) lies between relu(t) − |y| and relu(t), and above −relu(−t); and the
        score stays ≥ 0. Widened by the Conv's rounding (2γ mean Σ|terms|, γ|t|) and the pool's.
        """
        up = np.where(dw > 0, dw * pos, -dw * neg)  # mean relu(t)
        down = np.where(dw > 0, dw * neg, -dw * pos)  # mean relu(−t)
        base, a = self.base[rows][:, k], 2 * self.gamma * self.a_mean[rows][:, k]
        g = self.gamma
        if self.h.relu:
            high = (base + a + (1 + g) * up) * (1 + self.pool)
            low = np.maximum.reduce([np.zeros_like(up), (1 - g) * up - self.y_abs[rows][:, k] - a,
                                     base - a - (1 + g) * down]) * (1 - self.pool)
        else:
            exact = base + up - down
            err = a + g * (up + down) + self.pool * (self.base_abs[rows][:, k] + np.abs(exact) + a)
            high, low = exact + err, exact - err
        return low, high

    def _settled(self, rows: slice, k: np.ndarray, delta: np.ndarray, slack: np.ndarray) -> np.ndarray:
        """Whether the interval Δ ± slack stays clear of both decision edges, by more than the analysis's own
        rounding allowance (tau, and half a Softmax tie band), so that it decides the fault as it is."""
        r = np.arange(rows.start, rows.start + len(delta))[:, None]
        guard = 2 * (self.tau_w[r] + SOFTMAX_TIE)
        with np.errstate(invalid="ignore"):
            return (np.abs(delta - self.lo[r, k]) > slack + guard) & (np.abs(delta - self.hi[r, k]) > slack + guard)

    def _positions(self, n: np.ndarray, k: np.ndarray, col: np.ndarray | None,
                   dw: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """(pairs, golden Conv outputs y, changes t = δ·x), P wide, in chunks of a few tens of MB."""
        step = max(1, EXACT_CELLS // self.P)
        for s in range(0, len(n), step):
            i = slice(s, s + step)
            x = 1.0 if col is None else self.x[n[i], col[i]].astype(np.float64)
            yield i, self.y[n[i], k[i]].astype(np.float64), dw[i, None] * x * np.ones(self.P)

    def _exact(self, n: np.ndarray, k: np.ndarray, col: np.ndarray | None,
               dw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Δ and its slack, position by position, for the pairs (image n[i], fault of class k[i], δ dw[i])."""
        out, err = np.empty(len(n)), np.empty(len(n))
        for i, y, t in self._positions(n, k, col, dw):
            z = y + t
            out[i] = (self._act(z) - self._act(y)).sum(axis=1) / self.P
            live = np.ones_like(z, bool)
            if self.h.relu:  # a position whose faulty value is surely negative is exactly 0 after the ReLU
                live = z + 2 * self.gamma * self.a_max[n[i], k[i], None] + self.gamma * np.abs(t) > 0
            conv = self.gamma * (np.abs(t) * live).sum(axis=1) / self.P
            # the pool's sum of the faulty channel: base_abs (in tau) plus what the fault adds
            added = np.abs(out[i]) if self.h.relu else np.abs(t).sum(axis=1) / self.P
            err[i] = conv + self.pool * (added + conv)
        return out, err

    # -- a stored Conv output: one position of channel k ---------------------------------------------------

    def output_site(self) -> Site:
        name, P = self.h.output, self.P
        peak, scale = self.policy.element_peak(name), self.policy.act_scale(name, self.fmt)
        tau = self.pool * self.base_abs.max(axis=1)
        classes = np.arange(self.C * P) // P

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            k, p = ks // P, ks % P
            golden = self.y[rows][:, k, p]
            with np.errstate(all="ignore"):
                new = flip_bit(golden, bit, self.fmt, scale, peak).astype(np.float64)
                old, kept = self._act(golden.astype(np.float64)), self._act(new)  # a clip makes NaN 0
                change = (kept - old) / P
                finite = (P * self.base_abs[rows][:, k] + np.abs(kept)) * (1 + GUARD) < FINITE_EDGE
                # rectified values only add up: past FLT_MAX the pool's sum is +Inf
                overflows = self.h.relu & ((P * self.base[rows][:, k] - old + kept) * (1 - self.pool) > INF_EDGE)
                nan_score = INF_SCORE if self.h.softmax else -INF_SCORE  # as for a weight fault
                sentinel = np.isnan(kept) | np.isinf(kept) | overflows
                change = np.select([np.isnan(kept), (kept == np.inf) | overflows, kept == -np.inf, ~finite],
                                   [nan_score, INF_SCORE, -INF_SCORE, np.nan], change)
                return change, np.where(sentinel, 0.0, self.pool * np.abs(change))

        def recompute(n: np.ndarray, ks: np.ndarray, bit: int) -> np.ndarray:
            k, p, m = ks // P, ks % P, np.arange(len(n))
            maps = self.y[n, k].copy()
            maps[m, p] = flip_bit(self.y[n, k, p], bit, self.fmt, scale, peak)
            rows = self.S[n].copy()
            rows[m, k] = self.tail.pooled(maps)
            return rows

        return Site(name, "output", self.h.layer, self.C * P, self.base, tau, self.eye, classes,
                    np.full(self.C * P, np.inf), delta, recompute, classes=classes, scores=self.S.astype(np.float64),
                    reach=np.zeros((len(self.x), self.C)))
