"""Fault sites of the text-guided head, for the exact analysis.

    z = P f + b,   ẑ = z / max(‖z‖, eps),   cos = ẑ Wᵀ,   logits = scale · cos

(`scale` is None when exp(s) is folded into W, so cos is the output.) A flip in
P[e, j], b[e] or z[e] moves z along e_e, a flip in f[j] moves z along P[:, j].
While ‖z'‖ is finite and positive the argmax of the cosines is the argmax of
W z' — the norm and the scale are positive factors — so these faults are lines
in the unnormalised score space S = W z, with directions W[:, e] and (W P)[:, j].
A flip in W[c, e] or in a cosine moves one class's score in cosine space.
Float32 overflow of ‖z'‖ (huge exponent flips), NaN and Inf are outside that
argument and are recomputed by the float32 forward pass, as is any fault within
rounding of a tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from harden.fi.bitflip import tensor_scale
from harden.fi.exact_linear import LOGIT_LIMIT, output_site
from harden.fi.exact_site import (
    SOFTMAX_TIE, U32, RangePolicy, Site, activation_change, clamp32, clamp64, flip_bit, flip_delta, weight_change,
)

# Below this |z'| the sum of squares in ‖z'‖ cannot overflow float32 (2⁶⁴ ≈ 1.8e19 squares to the limit).
Z_LIMIT = 1e19


@dataclass
class TextHead:
    """Projection, L2 normalisation, cosine classifier and scale, with the ONNX names of their tensors."""

    proj_weight: np.ndarray
    proj_bias: np.ndarray
    weight: np.ndarray
    scale: float | None
    eps: float
    input: str
    proj_output: str
    cosine: str
    output: str
    proj_weight_name: str
    proj_bias_name: str
    weight_name: str
    proj_layer: str
    layer: str

    kind = "text"
    # weight tensors the model stores transposed relative to the layout above (set by exact_onnx)
    transposed: tuple[str, ...] = ()
    # "Softmax" or "LogSoftmax" when the model applies one to the scores (set by exact_onnx; see
    # exact_site.after_softmax), else ""
    softmax: str = ""
    # tensors the model range-clips itself, with their bounds (set by exact_onnx; see RangePolicy.clips)
    clips: dict[str, float] = field(default_factory=dict)
    # the normalised projection ẑ (the Div's output), which a float16 graph stores rounded (set by exact_onnx)
    unit: str = ""

    def normalise(self, z: np.ndarray) -> np.ndarray:
        """ẑ in float32, as ReduceL2 → Max(eps) → Div compute it."""
        z = np.asarray(z, np.float32)
        with np.errstate(all="ignore"):
            norm = np.sqrt(np.sum(z * z, axis=1, keepdims=True, dtype=np.float32))
            return z / np.maximum(norm, np.float32(self.eps))

    def from_z(self, z: np.ndarray, peak_cos: float | None = None) -> np.ndarray:
        """float32 forward pass from the projection output to the logits."""
        with np.errstate(all="ignore"):
            cos = clamp32(self.normalise(z) @ self.weight.T, peak_cos)
            return cos if self.scale is None else (cos * np.float32(self.scale)).astype(np.float32)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """float32 reference forward pass, the model's own range clips on z and the cosines included."""
        z = np.asarray(features, np.float32) @ self.proj_weight.T + self.proj_bias
        return self.from_z(clamp32(z, self.clips.get(self.proj_output)), self.clips.get(self.cosine))

    def sites(self, features: np.ndarray, tensors: dict[str, np.ndarray], fmt: str,
              policy: RangePolicy) -> list[Site]:
        """Every site, given the features and the golden float32 z, cosines and logits by tensor name (and ẑ,
        under `self.unit`, where the graph's own differs from `normalise`'s: a float16 graph's)."""
        return _TextSites(self, features, tensors, fmt, policy).all()


class _TextSites:
    def __init__(self, head: TextHead, f: np.ndarray, tensors: dict[str, np.ndarray], fmt: str,
                 policy: RangePolicy) -> None:
        self.h, self.fmt, self.policy = head, fmt, policy
        self.f = np.ascontiguousarray(f, np.float32)
        self.z = np.ascontiguousarray(tensors[head.proj_output], np.float32)
        self.cos = np.ascontiguousarray(tensors[head.cosine], np.float32)
        self.L = np.ascontiguousarray(tensors[head.output], np.float32)
        self.P, self.b, self.W = (np.ascontiguousarray(a, np.float32)
                                  for a in (head.proj_weight, head.proj_bias, head.weight))
        self.E, self.d = self.P.shape
        self.C = self.W.shape[0]
        self.P64, self.W64, self.f64 = (a.astype(np.float64) for a in (self.P, self.W, self.f))
        self.b64 = self.b.astype(np.float64)
        zabs = np.abs(self.f64) @ np.abs(self.P64).T + np.abs(self.b64)
        self.kz = (self.d + self.E + 10) * U32
        self.tau_z = self.kz * np.max(zabs @ np.abs(self.W64).T, axis=1)
        self.wmax = np.abs(self.W64).max(axis=0)  # E
        self.zn = np.ascontiguousarray(tensors[head.unit], np.float32) if head.unit in tensors \
            else head.normalise(self.z)
        # logits per unit of a cosine; a Softmax tie band is converted with it (exact_site.after_softmax)
        self.mult = 1.0 if head.scale is None else float(head.scale)
        # the model's own range clips (rewrite --range-clip) on z and on the cosines, if any
        self.clip_z = policy.clips.get(head.proj_output)
        self.clip_cos = policy.clips.get(head.cosine)

    def _leaders(self, zb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(largest z·W_c, second largest, ‖z‖) per image (N×1 each), what the cosines' clip tests read."""
        zb = np.asarray(zb, np.float64)
        ranked = np.sort(zb @ self.W64.T, axis=1)
        return ranked[:, -1:], ranked[:, -2:-1], np.linalg.norm(zb, axis=1)[:, None]

    def _clip_radius(self, zb: np.ndarray) -> np.ndarray | None:
        """r (N×E): a change of z[e] by |Δ| ≤ r passes `_clip_free`'s test of the cosines' clip, with
        ‖zb + Δe‖ ≥ ‖zb‖ − r (each line solves one of its two conditions for r). None: no clip on the cosines
        (z's own clip is the closed form's clamp)."""
        if self.clip_cos is None:
            return None
        s1, s2, norm = self._leaders(zb)
        k, p, w = self.kz, self.clip_cos, self.wmax[None, :] * (1 + self.kz)
        below = (self._clip_room() * norm - s2 - k * np.abs(s2)) / (w + self._clip_room())
        above = (s1 - k * np.abs(s1) + p * norm) / (w + p)
        return np.maximum(0.99 * np.minimum(below, above), 0.0)

    def _clip_room(self) -> float:
        """The cosines' clip bound less a Softmax's tie band (in cosines): room the runner-up must stay under."""
        return float(self.clip_cos) - SOFTMAX_TIE / self.mult  # type: ignore[arg-type]

    def _clip_free(self, zb: np.ndarray, u: np.ndarray, group: np.ndarray,  # type: ignore[no-untyped-def]
                   z_clip: bool = False):
        """For faults k that move z along u[:, group[k]] (u: E×G) by Δ: whether the graph's clips downstream
        surely leave the top-1 alone, so that the closed form of z·W, which ignores them, holds.

        The cosines' clip bounds them to ±p; a clipped cosine can tie with another at p, where the lowest
        class wins. No tie can form while every class but the fault-free leader stays below p (less a Softmax's
        tie band) and the leader above −p: cos'_c·‖z'‖ is within |Δ|·max_c |W_c·u_g| of zb·W_c, with ‖z'‖ =
        ‖zb + Δ·u_g‖ exact. With `z_clip`, z's own clip must stay idle too: max_e |zb_e| + |Δ|·max_e |u_eg|
        below its bound. None: no clip downstream."""
        cos_clip = self.clip_cos
        zc = self.clip_z if z_clip else None
        if cos_clip is None and zc is None:
            return None
        zb = np.asarray(zb, np.float64)
        s1, s2, _ = self._leaders(zb)
        zz, zu = np.sum(zb * zb, axis=1)[:, None], zb @ u
        uu, uw = np.sum(u * u, axis=0), np.abs(self.W64 @ u).max(axis=0) * (1 + self.kz)
        zmax, umax = np.abs(zb).max(axis=1)[:, None], np.abs(u).max(axis=0)
        k = self.kz

        def clip_free(rows: slice, ks: np.ndarray, delta: np.ndarray) -> np.ndarray:
            size, g = np.abs(delta), group[ks]
            with np.errstate(all="ignore"):
                idle = np.ones(delta.shape, bool)
                if cos_clip is not None:
                    norm = np.sqrt(np.maximum(zz[rows] + 2 * delta * zu[rows][:, g] + delta * delta * uu[g], 0))
                    norm = np.maximum(norm, self.h.eps)
                    idle &= s2[rows] + k * np.abs(s2[rows]) + size * uw[g] < self._clip_room() * norm
                    idle &= s1[rows] - k * np.abs(s1[rows]) - size * uw[g] > -cos_clip * norm
                if zc is not None:
                    idle &= (zmax[rows] + size * umax[g]) * (1 + k) < zc
                return idle

        return clip_free

    def _zw_units(self, z: np.ndarray) -> np.ndarray:
        """Units of z·W per logit, fault-free: the scores are scale · z·W / max(‖z‖, eps)."""
        return np.maximum(np.linalg.norm(np.asarray(z, np.float64), axis=1), self.h.eps) / self.mult

    def all(self) -> list[Site]:
        sites = [self.proj_weight_site(), self.proj_bias_site(), self.input_site(), self.z_site(),
                 self.weight_site()]
        if self.h.scale is not None:
            sites.append(output_site(self.cos, self.policy, self.fmt, self.h.cosine, self.h.layer,
                                     scale=self.h.scale))
        sites.append(output_site(self.L, self.policy, self.fmt, self.h.output, self.h.layer))
        return sites

    def _z_base(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        peak = self.policy.tensor_peak(self.h.proj_output)
        zb = clamp32(self.z, peak)
        return zb, zb.astype(np.float64) @ self.W64.T, peak

    def _projection_site(self, values: np.ndarray, name: str, role: str, cols: int) -> Site:
        """P (cols = d, Δz = δ·f[j]) or b (cols = 1, Δz = δ): z[e] moves, e = k // cols."""
        flat = values.ravel()
        scale, vpeak = tensor_scale(values, self.fmt), self.policy.weight_peak(values)
        zb, base, peak = self._z_base()
        z64, zb64 = self.z.astype(np.float64), zb.astype(np.float64)
        kappa = self.kz * self.wmax
        x = self.f64 if cols == self.d else np.ones((len(self.f), 1))

        wdelta = flip_delta(values, self.fmt, scale, vpeak)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            e, j = ks // cols, ks % cols
            with np.errstate(all="ignore"):
                change = wdelta(ks, bit)[None, :] * x[rows, j]
            return weight_change(z64[rows, e], zb64[rows, e], change, peak, self.tau_z[rows], kappa[e])

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            e, j, m = k // cols, k % cols, np.arange(len(k))
            rows = zb[n].copy()
            p, bias = self.P[e].copy(), self.b[e].copy()
            if cols == self.d:
                p[m, j] = flip_bit(flat[k], bit, self.fmt, scale, vpeak)
            else:
                bias = flip_bit(flat[k], bit, self.fmt, scale, vpeak)
            with np.errstate(all="ignore"):
                rows[m, e] = np.einsum("md,md->m", self.f[n], p) + bias
            return self.h.from_z(clamp32(rows, peak), self.clip_cos)

        k = np.arange(values.size)
        prune = {"weight_delta": wdelta, "x_abs": np.abs(x), "col": k % cols, "kappa": kappa} if cols > 1 else {}
        return Site(name, role, self.h.proj_layer, k.size, base, self.tau_z, self.W64.T.copy(), k // cols,
                    np.full(k.size, Z_LIMIT), delta, recompute, zmax=self._one_hot_zmax(zb, k // cols),
                    units=self._zw_units(zb), units_slope=np.full(self.E, 1 / self.mult),
                    clip_free=self._clip_free(zb, np.eye(self.E), k // cols),
                    clip_radius=self._clip_radius(zb), nan_to_zero=self.clip_cos is not None,
                    **prune)  # type: ignore[arg-type]

    @staticmethod
    def _one_hot_zmax(zb: np.ndarray, group: np.ndarray):  # type: ignore[no-untyped-def]
        """max|z'| is |z[e] + Δ| once that dominates, which is all the overflow test asks about."""
        z64 = zb.astype(np.float64)

        def zmax(rows: slice, ks: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with np.errstate(invalid="ignore", over="ignore"):
                value = np.abs(z64[rows, group[ks]] + delta)
            return value, value

        return zmax

    def proj_weight_site(self) -> Site:
        return self._projection_site(self.P, self.h.proj_weight_name, "proj_weight", self.d)

    def proj_bias_site(self) -> Site:
        return self._projection_site(self.b, self.h.proj_bias_name, "proj_bias", 1)

    def input_site(self) -> Site:
        name = self.h.input
        fb = clamp32(self.f, self.policy.tensor_peak(name))
        peak = self.policy.element_peak(name)
        zb = self.z.astype(np.float64) if np.array_equal(fb, self.f) else fb.astype(np.float64) @ self.P64.T + self.b64
        if self.clip_z is not None:
            zb = clamp64(zb, self.clip_z)
        base = zb @ self.W64.T
        vabs = (np.abs(self.W64) @ np.abs(self.P64)).max(axis=0)  # d
        scale = self.policy.act_scale(name, self.fmt)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            change = activation_change(self.f[rows, ks], fb[rows, ks], bit, self.fmt, peak, scale)
            with np.errstate(invalid="ignore"):
                return change, self.kz * vabs[ks] * np.abs(change)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            m = np.arange(len(k))
            rows = fb[n].copy()
            rows[m, k] = flip_bit(self.f[n, k], bit, self.fmt, scale, peak)
            with np.errstate(all="ignore"):
                return self.h.from_z(clamp32(rows @ self.P.T + self.b, self.clip_z), self.clip_cos)

        pmax = np.abs(self.P64).max(axis=0)
        zbmax = np.abs(zb).max(axis=1)[:, None]

        def zmax(rows: slice, ks: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with np.errstate(invalid="ignore", over="ignore"):
                reach = np.abs(delta) * pmax[ks]
                return np.where(np.isnan(delta), np.nan, reach - zbmax[rows]), reach + zbmax[rows]

        with np.errstate(divide="ignore"):
            limit = Z_LIMIT / (np.sqrt(self.E) * pmax)
        # a clip on z keeps z' finite, so the overflow closed form does not apply: such faults go to float32
        return Site(self.h.input, "input", self.h.proj_layer, self.d, base, self.tau_z,
                    (self.W64 @ self.P64).T.copy(), np.arange(self.d), limit, delta, recompute,
                    zmax=zmax if self.clip_z is None else None,
                    units=self._zw_units(zb), units_slope=np.linalg.norm(self.P64, axis=0) / self.mult,
                    clip_free=self._clip_free(zb, self.P64, np.arange(self.d), z_clip=True),
                    nan_to_zero=self.clip_cos is not None)

    def z_site(self) -> Site:
        zb, base, _ = self._z_base()
        peak = self.policy.element_peak(self.h.proj_output)
        scale = self.policy.act_scale(self.h.proj_output, self.fmt)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            change = activation_change(self.z[rows, ks], zb[rows, ks], bit, self.fmt, peak, scale)
            with np.errstate(invalid="ignore"):
                return change, self.kz * self.wmax[ks] * np.abs(change)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            m = np.arange(len(k))
            rows = zb[n].copy()
            rows[m, k] = flip_bit(self.z[n, k], bit, self.fmt, scale, peak)
            return self.h.from_z(rows, self.clip_cos)

        return Site(self.h.proj_output, "proj_output", self.h.proj_layer, self.E, base, self.tau_z,
                    self.W64.T.copy(), np.arange(self.E), np.full(self.E, Z_LIMIT), delta, recompute,
                    zmax=self._one_hot_zmax(zb, np.arange(self.E)), units=self._zw_units(zb),
                    units_slope=np.full(self.E, 1 / self.mult),
                    clip_free=self._clip_free(zb, np.eye(self.E), np.arange(self.E)),
                    nan_to_zero=self.clip_cos is not None)

    def weight_site(self) -> Site:
        """W[c, e]: cosine c moves by δ·ẑ[e]; the Gemm/MatMul output (cosines) is what the policy clamps."""
        flat = self.W.ravel()
        scale, vpeak = tensor_scale(self.W, self.fmt), self.policy.weight_peak(self.W)
        peak = self.policy.tensor_peak(self.h.cosine)
        zn64 = self.zn.astype(np.float64)
        raw = zn64 @ self.W64.T
        base = clamp64(raw, peak)
        kappa = 2 * (self.E + 6) * U32
        reach = np.abs(zn64) @ np.abs(self.W64).T  # Σ|terms| of each cosine
        tau = kappa * np.max(reach, axis=1) + 2 * U32 * np.abs(raw).max(axis=1)
        wdelta = flip_delta(self.W, self.fmt, scale, vpeak)

        def delta(rows: slice, ks: np.ndarray, bit: int) -> tuple[np.ndarray, np.ndarray]:
            c, e = ks // self.E, ks % self.E
            with np.errstate(all="ignore"):
                change = wdelta(ks, bit)[None, :] * zn64[rows, e]
            return weight_change(raw[rows, c], base[rows, c], change, peak, tau[rows], kappa)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            c, e, m = k // self.E, k % self.E, np.arange(len(k))
            rows = clamp32(self.cos[n], peak).copy()
            w = self.W[c].copy()
            w[m, e] = flip_bit(flat[k], bit, self.fmt, scale, vpeak)
            with np.errstate(all="ignore"):
                rows[m, c] = np.einsum("me,me->m", self.zn[n], w)
                rows = clamp32(rows, peak)
                return rows if self.h.scale is None else (rows * np.float32(self.h.scale)).astype(np.float32)

        k = np.arange(self.C * self.E)
        return Site(self.h.weight_name, "weight", self.h.layer, k.size, base, tau, np.eye(self.C), k // self.E,
                    np.full(k.size, LOGIT_LIMIT / self.mult), delta, recompute, classes=k // self.E,
                    weight_delta=wdelta, x_abs=np.abs(zn64), col=k % self.E, kappa=np.full(self.C, kappa),
                    scores=clamp32(self.cos, peak).astype(np.float64), units=np.full(len(self.f), 1 / self.mult),
                    reach=reach)
