"""Exact final-layer fault analysis: every element × every bit × every image, in closed form.

A single flip in the final classifier moves image n's scores along one line,
S' = S_n + Δ·v, so the faulty top-1 stays the fault-free class t exactly when Δ
lies in an interval [lo, hi] that the upper envelope of C lines gives in O(C).
Each fault then costs two comparisons instead of a forward pass, and weight
flips too small to cross any image's interval are counted without visiting the
images at all.

The closed form is real arithmetic; the model runs in float32. A fault is
decided in closed form only when a rigorous float32 rounding bound cannot
change the comparison (the score margin at Δ, bounded below through the
concavity of the margin in Δ, exceeds twice the rounding bound), and when Δ is
finite and far from overflow. Every other fault — non-finite values, huge
exponent flips, margins within rounding of a tie — is recomputed by a float32
forward pass of the head, so the counts equal those of brute-force injection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from harden.errors import HardenError
from harden.fi.bitflip import check_format
from harden.fi.exact_site import Site

SCHEMA = "harden.exact/1"
# float64 cells per working array; bounds the memory of a chunk to a few tens of MB.
CHUNK_CELLS = 1 << 21


@dataclass
class ExactSiteResult:
    """Exact counts for one site, per bit position (index = bit, 0 = least significant)."""

    tensor: str
    role: str
    layer: str
    elements: int
    images: int
    fmt: str
    faults: list[int]
    sdc: list[int]
    due: list[int]
    hit_faults: list[int] | None = None
    hit_sdc: list[int] | None = None
    recomputed: int = 0

    @property
    def total_faults(self) -> int:
        return int(sum(self.faults))

    @property
    def total_sdc(self) -> int:
        return int(sum(self.sdc))

    @property
    def total_due(self) -> int:
        return int(sum(self.due))

    @property
    def sdc_fraction(self) -> float:
        return self.total_sdc / self.total_faults if self.total_faults else math.nan

    @property
    def due_fraction(self) -> float:
        return self.total_due / self.total_faults if self.total_faults else math.nan

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "sdc_fraction": self.sdc_fraction, "due_fraction": self.due_fraction}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ExactSiteResult:
        names = [f.name for f in cls.__dataclass_fields__.values()]
        return cls(**{k: data[k] for k in names if k in data})  # type: ignore[arg-type]


@dataclass
class ExactResult:
    """The exact analysis of one model's final layer under one range policy and number format."""

    head: str
    policy: str
    fmt: str
    images: int
    sites: list[ExactSiteResult] = field(default_factory=list)
    seconds: float = 0.0
    schema: str = SCHEMA

    @property
    def total_faults(self) -> int:
        return sum(s.total_faults for s in self.sites)

    @property
    def total_sdc(self) -> int:
        return sum(s.total_sdc for s in self.sites)

    @property
    def recomputed(self) -> int:
        return sum(s.recomputed for s in self.sites)

    def site(self, tensor: str) -> ExactSiteResult:
        for s in self.sites:
            if s.tensor == tensor:
                return s
        raise HardenError(f"no exact result for tensor {tensor!r}; have {[s.tensor for s in self.sites]}")

    def to_dict(self) -> dict[str, object]:
        return {"schema": self.schema, "head": self.head, "policy": self.policy, "fmt": self.fmt,
                "images": self.images, "seconds": self.seconds, "total_faults": self.total_faults,
                "total_sdc": self.total_sdc, "recomputed": self.recomputed,
                "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ExactResult:
        if data.get("schema") != SCHEMA:
            raise HardenError(f"exact result schema {data.get('schema')!r} is not {SCHEMA!r}")
        return cls(head=str(data["head"]), policy=str(data["policy"]), fmt=str(data["fmt"]),
                   images=int(data["images"]), seconds=float(data["seconds"]),  # type: ignore[arg-type]
                   sites=[ExactSiteResult.from_dict(s) for s in data["sites"]])  # type: ignore[union-attr]


def outcome32(logits: np.ndarray, top1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sdc, non-finite) of float32 output rows, as the engine decides them: NaN never wins the
    argmax, a row of NaN is class −1 (an SDC), and a row holding NaN or Inf is DUE-like."""
    nan = np.isnan(logits)
    cls = np.argmax(np.where(nan, -np.inf, logits), axis=1)
    cls[nan.all(axis=1)] = -1
    return cls != top1, ~np.isfinite(logits).all(axis=1)


def envelope(base: np.ndarray, top1: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lo, hi (N×G): argmax(base_n + Δ·directions[g]) is top1[n] for Δ strictly inside (lo, hi).

    Class c stays below t while a_c + Δ·b_c ≥ 0 with a_c = S_t − S_c and
    b_c = v_t − v_c: a lower bound on Δ where b_c > 0, an upper bound where b_c < 0.
    """
    n, c = base.shape
    g = directions.shape[0]
    rows = np.arange(n)
    a = base[rows, top1][:, None] - base  # N×C
    a[rows, top1] = np.inf
    lo = np.empty((n, g))
    hi = np.empty((n, g))
    step = max(1, CHUNK_CELLS // max(1, n * c))
    with np.errstate(divide="ignore", invalid="ignore"):
        for start in range(0, g, step):
            v = directions[start:start + step]  # Gc×C
            b = v[:, top1].T[:, :, None] - v[None, :, :]  # N×Gc×C
            ratio = -a[:, None, :] / b
            lo[:, start:start + step] = np.where(b > 0, ratio, -np.inf).max(axis=2)
            hi[:, start:start + step] = np.where(b < 0, ratio, np.inf).min(axis=2)
            blocked = ((b == 0) & (a[:, None, :] < 0)).any(axis=2)
            lo[:, start:start + step][blocked] = np.inf
    return lo, hi


def margin(base: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """S_t − max over the other classes (negative when t is not the base's argmax)."""
    rows = np.arange(len(base))
    others = base.copy()
    others[rows, top1] = -np.inf
    return base[rows, top1] - others.max(axis=1)


def _margin_bound(delta: np.ndarray, lo: np.ndarray, hi: np.ndarray, m0: np.ndarray) -> np.ndarray:
    """A lower bound on |margin(Δ)|, the score gap that decides the top-1 at Δ.

    margin(Δ) = min_c (a_c + Δ b_c) is concave with margin(lo) = margin(hi) = 0, so
    on each side of 0 it lies above the chord from (0, m0) inside [lo, hi] and
    below its extension outside; with no bound on a side it is monotone there.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        side = np.where(delta < 0, lo, hi)
        bound = m0 * np.abs(delta - side) / np.abs(side)
    return np.where(np.isfinite(side), bound, m0)


def _chunks(size: int, step: int) -> Iterator[np.ndarray]:
    for start in range(0, size, step):
        yield np.arange(start, min(size, start + step))


def analyse_site(site: Site, top1: np.ndarray, fmt: str = "fp32") -> ExactSiteResult:
    """Exact SDC/DUE counts per bit for every element × bit × image of one site."""
    width = check_format(fmt)
    n = len(top1)
    lo_all, hi_all = envelope(site.base, top1, site.directions)
    m0 = margin(site.base, top1)
    m0_col = m0[:, None]
    tau_col = site.tau[:, None]
    near_tie = (m0 <= 2 * site.tau)[:, None]
    faults = np.zeros(width, np.int64)
    sdc = np.zeros(width, np.int64)
    due = np.zeros(width, np.int64)
    hit_faults = np.zeros(width, np.int64) if site.classes is not None else None
    hit_sdc = np.zeros(width, np.int64) if site.classes is not None else None
    per_class = np.bincount(top1, minlength=site.base.shape[1])
    recomputed = 0
    radius = _safe_radius(site, lo_all, hi_all, m0) if site.weight_delta is not None else None
    for ks in _chunks(site.size, max(1, CHUNK_CELLS // max(1, n))):
        rho = None
        if radius is not None:
            assert site.x_abs is not None and site.col is not None
            with np.errstate(divide="ignore"):
                rho = (radius[:, site.group[ks]] / site.x_abs[:, site.col[ks]]).min(axis=0)
        for bit in range(width):
            live = ks
            if rho is not None:
                assert site.weight_delta is not None
                small = np.abs(site.weight_delta(ks, bit)) <= rho
                live = ks[~small]
                faults[bit] += n * int(small.sum())
                if hit_faults is not None:
                    hit_faults[bit] += int(per_class[site.classes[ks[small]]].sum())  # type: ignore[index]
                if not live.size:
                    continue
            delta, slack = site.delta(live, bit)
            groups = site.group[live]
            lo, hi = lo_all[:, groups], hi_all[:, groups]
            with np.errstate(invalid="ignore"):
                flips = (delta < lo) | (delta > hi)
                unsafe = (~np.isfinite(delta) | (np.abs(delta) > site.limit[live])
                          | (_margin_bound(delta, lo, hi, m0_col) <= 2 * (tau_col + slack)) | near_tie)
            flips &= ~unsafe
            fault_due = np.zeros_like(flips)
            if unsafe.any():
                rows, cols = np.nonzero(unsafe)
                recomputed += len(rows)
                for part in _chunks(len(rows), 4096):
                    logits = site.recompute(rows[part], live[cols[part]], bit)
                    s, d = outcome32(logits, top1[rows[part]])
                    flips[rows[part], cols[part]] = s
                    fault_due[rows[part], cols[part]] = d
            faults[bit] += flips.size
            sdc[bit] += int(flips.sum())
            due[bit] += int(fault_due.sum())
            if hit_faults is not None and hit_sdc is not None:
                hit = site.classes[live][None, :] == top1[:, None]  # type: ignore[index]
                hit_faults[bit] += int(hit.sum())
                hit_sdc[bit] += int((flips & hit).sum())
    return ExactSiteResult(
        tensor=site.tensor, role=site.role, layer=site.layer, elements=site.size, images=n, fmt=fmt,
        faults=faults.tolist(), sdc=sdc.tolist(), due=due.tolist(),
        hit_faults=None if hit_faults is None else hit_faults.tolist(),
        hit_sdc=None if hit_sdc is None else hit_sdc.tolist(), recomputed=recomputed,
    )


def _safe_radius(site: Site, lo: np.ndarray, hi: np.ndarray, m0: np.ndarray) -> np.ndarray:
    """r (N×G): any fault with |δ·x| ≤ r keeps top-1 for that image, beyond any float32 doubt.

    With |Δ| ≤ r ≤ R = min(−lo, hi) the margin is at least m0(1 − r/R) and the
    rounding bound at most 2τ + 2κr, so r < (m0 − 2τ)/(m0/R + 2κ) suffices.
    """
    assert site.kappa is not None
    reach = np.minimum(-lo, hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = 0.99 * (m0[:, None] - 2 * site.tau[:, None]) / (m0[:, None] / reach + 2 * site.kappa[None, :])
    r = np.where((m0[:, None] > 2 * site.tau[:, None]) & (reach > 0), r, 0.0)
    return np.minimum(np.nan_to_num(r, nan=0.0), site.limit.min() if site.limit.size else np.inf)


def analyse_sites(sites: list[Site], top1: np.ndarray, fmt: str, head: str, policy: str) -> ExactResult:
    """Run `analyse_site` over every site and time the whole analysis."""
    start = time.perf_counter()
    results = [analyse_site(site, top1, fmt) for site in sites]
    return ExactResult(head=head, policy=policy, fmt=fmt, images=len(top1), sites=results,
                       seconds=time.perf_counter() - start)
