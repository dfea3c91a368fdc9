"""Fault sites of a plain linear classifier, logits = W f + b, for the exact analysis.

A flip in W[c, j] or b[c] moves logit c alone (direction e_c), a flip in f[j]
moves every logit along W[:, j], and a flip in an output logit moves that logit
by the flipped value's difference. Under the clamp policy the clamped tensor is
the faulted activation itself, or for a weight fault the Gemm's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harden.fi.bitflip import tensor_scale
from harden.fi.exact_site import (
    U32, RangePolicy, Site, activation_change, clamp32, clamp64, flip_bit, flip_delta, weight_change,
)

# Beyond this |Δ| a score may overflow float32 (max 3.4e38); such faults are recomputed in float32.
LOGIT_LIMIT = 1e38


@dataclass
class LinearHead:
    """The final Gemm (or MatMul + Add) of a classifier, with the ONNX names of its tensors."""

    weight: np.ndarray
    bias: np.ndarray | None
    input: str
    output: str
    weight_name: str
    bias_name: str | None
    layer: str

    kind = "linear"
    # weight tensors the model stores transposed relative to the layout above (set by exact_onnx)
    transposed: tuple[str, ...] = ()
    # "Softmax" or "LogSoftmax" when the model applies one to the scores (set by exact_onnx; see
    # exact_site.after_softmax), else ""
    softmax: str = ""
    # tensors the model range-clips itself, with their bounds (set by exact_onnx; see RangePolicy.clips)
    clips: dict[str, float] = field(default_factory=dict)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 reference forward pass, the model's own range clip on the scores included."""
        out = np.asarray(features, np.float32) @ self.weight.T
        return clamp32(out + self.bias if self.bias is not None else out, self.clips.get(self.output))

    def sites(self, features: np.ndarray, logits: np.ndarray, fmt: str,
              policy: RangePolicy) -> list[Site]:
        """Weight, bias, input and output sites for `features` (N×d) and the golden float32 `logits`."""
        return _LinearSites(self, features, logits, fmt, policy).all()


class _LinearSites:
    """The shared float64 quantities of one head and data set, and the sites built from them."""

    def __init__(self, head: LinearHead, f: np.ndarray, logits: np.ndarray, fmt: str,
                 policy: RangePolicy) -> None:
        self.h, self.fmt, self.policy = head, fmt, policy
        self.f = np.ascontiguousarray(f, np.float32)
        self.L = np.ascontiguousarray(logits, np.float32)
        self.W = np.ascontiguousarray(head.weight, np.float32)
        self.C, self.d = self.W.shape
        self.b = np.zeros(self.C, np.float32) if head.bias is None else np.asarray(head.bias, np.float32)
        self.W64, self.f64, self.b64 = self.W.astype(np.float64), self.f.astype(np.float64), self.b.astype(np.float64)
        self.raw = self.f64 @ self.W64.T + self.b64
        self.peak_out = policy.tensor_peak(head.output)
        self.graph_clip = policy.clips.get(head.output)  # the model's own range clip on its scores, if any
        self.reach = np.abs(self.f64) @ np.abs(self.W64).T + np.abs(self.b64)  # Σ|terms| of each score
        self.tau = (self.d + 3) * U32 * np.max(self.reach, axis=1)
        self.eye = np.eye(self.C)
        # what the top-1 compares: a weight or bias fault leaves every other class at exactly this score
        self.scores = clamp32(self.L, self.peak_out).astype(np.float64)

    def all(self) -> list[Site]:
        sites = [self.weight_site()]
        if self.h.bias is not None and self.h.bias_name is not None:
            sites.append(self.bias_site())
        return sites + [self.input_site(), self.output_site()]

    def _out_rows(self, n: np.ndarray) -> np.ndarray:
        return clamp32(self.L[n], self.peak_out).copy()

    def weight_site(self) -> Site:
        flat = self.W.ravel()
        scale, vpeak = tensor_scale(self.W, self.fmt), self.policy.weight_peak(self.W)
        base = clamp64(self.raw, self.peak_out)
        kappa = (self.d + 2) * U32

        wdelta = flip_delta(self.W, self.fmt, scale, vpeak)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            c, j = ks // self.d, ks % self.d
            with np.errstate(all="ignore"):
                change = wdelta(ks, bit)[None, :] * self.f64[rows, j]
            return weight_change(self.raw[rows, c], base[rows, c], change, self.peak_out, self.tau[rows], kappa)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            c, j, m = k // self.d, k % self.d, np.arange(len(k))
            rows = self._out_rows(n)
            w = self.W[c].copy()
            w[m, j] = flip_bit(flat[k], bit, self.fmt, scale, vpeak)
            with np.errstate(all="ignore"):
                rows[m, c] = np.einsum("md,md->m", self.f[n], w) + self.b[c]
            return clamp32(rows, self.peak_out)

        k = np.arange(self.C * self.d)
        return Site(self.h.weight_name, "weight", self.h.layer, k.size, base, self.tau, self.eye, k // self.d,
                    np.full(k.size, LOGIT_LIMIT), delta, recompute, classes=k // self.d,
                    weight_delta=wdelta, x_abs=np.abs(self.f64), col=k % self.d, kappa=np.full(self.C, kappa),
                    scores=self.scores, reach=self.reach)

    def bias_site(self) -> Site:
        scale, vpeak = tensor_scale(self.b, self.fmt), self.policy.weight_peak(self.b)
        base = clamp64(self.raw, self.peak_out)
        kappa = 2 * U32

        bdelta = flip_delta(self.b, self.fmt, scale, vpeak)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            change = np.broadcast_to(bdelta(ks, bit), (len(self.f[rows]), len(ks)))
            return weight_change(self.raw[rows, ks], base[rows, ks], change, self.peak_out, self.tau[rows], kappa)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            m = np.arange(len(k))
            rows = self._out_rows(n)
            with np.errstate(all="ignore"):
                rows[m, k] = np.einsum("md,md->m", self.f[n], self.W[k]) + flip_bit(self.b[k], bit, self.fmt, scale, vpeak)
            return clamp32(rows, self.peak_out)

        k = np.arange(self.C)
        return Site(str(self.h.bias_name), "bias", self.h.layer, self.C, base, self.tau, self.eye, k,
                    np.full(self.C, LOGIT_LIMIT), delta, recompute, classes=k, scores=self.scores,
                    reach=self.reach)

    def input_site(self) -> Site:
        name = self.h.input
        f_base = clamp32(self.f, self.policy.tensor_peak(name))
        peak = self.policy.element_peak(name)
        base = f_base.astype(np.float64) @ self.W64.T + self.b64
        vmax = np.abs(self.W64).max(axis=0)
        scale = self.policy.act_scale(name, self.fmt)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            change = activation_change(self.f[rows, ks], f_base[rows, ks], bit, self.fmt, peak, scale)
            with np.errstate(invalid="ignore"):
                return change, (self.d + 2) * U32 * vmax[ks] * np.abs(change)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            m = np.arange(len(k))
            rows = f_base[n].copy()
            rows[m, k] = flip_bit(self.f[n, k], bit, self.fmt, scale, peak)
            with np.errstate(all="ignore"):
                return clamp32((rows @ self.W.T + self.b).astype(np.float32), self.graph_clip)

        with np.errstate(divide="ignore"):
            limit = LOGIT_LIMIT / vmax
        return Site(self.h.input, "input", self.h.layer, self.d, base, self.tau, self.W64.T.copy(),
                    np.arange(self.d), limit, delta, recompute, clip_free=self._clip_free(base, vmax))

    def _clip_free(self, base: np.ndarray, vmax: np.ndarray):  # type: ignore[no-untyped-def]
        """For an input fault, which moves every score: whether the graph's own clip on the scores surely
        stays idle, every |score| staying below its bound after rounding. None: no such clip. (The range-output
        policy clamps only the faulted tensor, here the input.)"""
        if self.graph_clip is None:
            return None
        bound, top = self.graph_clip, np.abs(base).max(axis=1)

        def clip_free(rows: slice, ks: np.ndarray, delta: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore", over="ignore"):
                reach = top[rows, None] + np.abs(delta) * vmax[ks][None, :]
                return reach * (1 + 1e-6) + 2 * self.tau[rows, None] < bound

        return clip_free

    def output_site(self) -> Site:
        return output_site(self.L, self.policy, self.fmt, self.h.output, self.h.layer)


def output_site(logits: np.ndarray, policy: RangePolicy, fmt: str, tensor: str, layer: str,
                scale: float | None = None) -> Site:
    """A flip in a stored score (logits, or cosines times a positive `scale` afterwards).

    The faulty value is exact, so only the final float32 multiplication by the
    scale can round (monotonically: it may turn an order into a tie, never reverse it).
    """
    n, c = logits.shape
    base32 = clamp32(logits, policy.tensor_peak(tensor))
    peak = policy.element_peak(tensor)
    base = base32.astype(np.float64)
    mult = 1.0 if scale is None else float(scale)
    err = 0.0 if scale is None else 2 * U32
    tau = err * np.abs(base).max(axis=1)
    rscale = policy.act_scale(tensor, fmt)

    def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
        change = activation_change(logits[rows, ks], base32[rows, ks], bit, fmt, peak, rscale)
        with np.errstate(invalid="ignore"):
            return change, err * np.abs(change)

    def recompute(rows_n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
        m = np.arange(len(k))
        rows = base32[rows_n].copy()
        rows[m, k] = flip_bit(logits[rows_n, k], bit, fmt, rscale, peak)
        with np.errstate(all="ignore"):
            return rows if scale is None else (rows * np.float32(scale)).astype(np.float32)

    k = np.arange(c)
    limit = np.full(c, np.inf if scale is None else LOGIT_LIMIT / mult)
    units = None if scale is None else np.full(n, 1 / mult)
    return Site(tensor, "output" if scale is None else "cosine", layer, c, base, tau, np.eye(c), k, limit,
                delta, recompute, classes=k, scores=base, units=units)
