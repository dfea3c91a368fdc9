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
finite and far from overflow. Before an L2 normalisation, float32 overflow has
a closed form too (z' with Inf/NaN: every score NaN; a finite z' whose square
overflows: every score 0, so class 0 wins). Every other fault — non-finite
logits, huge exponent flips, margins within rounding of a tie — is recomputed
by a numpy float32 forward pass of the head. A weight or bias fault moves one
score while every other keeps its exact fault-free float32 value, so those are
decided against exact rivals (`unit_geometry`), with only the faulty score's own
rounding to allow for, even on an image whose margin is within rounding of a
tie. The closed-form decisions hold for any float32 accumulation order; the
recomputed ones follow numpy's order, which ONNX Runtime may not share for a
fault that sits exactly at a rounding tie.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from harden.errors import HardenError
from harden.fi.bitflip import check_format
from harden.fi.exact_site import Site
from harden.fi.outcome import fault_outcome

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
    def for_stored(cls, tensor: str, role: str, layer: str, stored: np.ndarray, images: int,
                   hits: bool = True) -> ExactSiteResult:
        """Empty counts for a site of stored integers: one per bit of their type. `hits`: whether faults are
        also counted by whether they strike the image's top-1 class."""
        width = 8 * stored.dtype.itemsize
        return cls(tensor=tensor, role=role, layer=layer, elements=int(stored.size), images=images,
                   fmt=stored.dtype.name, faults=[0] * width, sdc=[0] * width, due=[0] * width,
                   hit_faults=[0] * width if hits else None, hit_sdc=[0] * width if hits else None)

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
    # images left out as rounding ties of their fault-free top-1 (exact_onnx.model_sites says which)
    rounding_ties: int = 0

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
                "total_sdc": self.total_sdc, "recomputed": self.recomputed, "rounding_ties": self.rounding_ties,
                "sites": [s.to_dict() for s in self.sites]}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ExactResult:
        if data.get("schema") != SCHEMA:
            raise HardenError(f"exact result schema {data.get('schema')!r} is not {SCHEMA!r}")
        return cls(head=str(data["head"]), policy=str(data["policy"]), fmt=str(data["fmt"]),
                   images=int(data["images"]), seconds=float(data["seconds"]),  # type: ignore[arg-type]
                   sites=[ExactSiteResult.from_dict(s) for s in data["sites"]],  # type: ignore[union-attr]
                   rounding_ties=int(data.get("rounding_ties", 0)))  # type: ignore[call-overload]


def envelope(base: np.ndarray, top1: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, ...]:
    """lo, hi, up, down (N×G): argmax(base_n + Δ·directions[g]) is top1[n] for Δ strictly inside (lo, hi).

    Class c stays below t while a_c + Δ·b_c ≥ 0 with a_c = S_t − S_c and
    b_c = v_t − v_c: a lower bound on Δ where b_c > 0, an upper bound where b_c < 0.
    up = min_c b_c and down = min_c −b_c are the slopes at which the margin
    surely grows as Δ moves up or down.
    """
    n, c = base.shape
    g = directions.shape[0]
    rows = np.arange(n)
    a = base[rows, top1][:, None] - base  # N×C
    a[rows, top1] = np.inf
    lo, hi, up, down = (np.empty((n, g)) for _ in range(4))
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
            others = np.isfinite(a)[:, None, :]
            up[:, start:start + step] = np.where(others, b, np.inf).min(axis=2)
            down[:, start:start + step] = np.where(others, -b, np.inf).min(axis=2)
    return lo, hi, up, down


def margin(base: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """S_t − max over the other classes (negative when t is not the base's argmax)."""
    rows = np.arange(len(base))
    others = base.copy()
    others[rows, top1] = -np.inf
    return base[rows, top1] - others.max(axis=1)


def _margin_bound(delta: np.ndarray, lo: np.ndarray, hi: np.ndarray, up: np.ndarray, down: np.ndarray,
                  m0: np.ndarray) -> np.ndarray:
    """A lower bound on |margin(Δ)|, the score gap that decides the top-1 at Δ.

    margin(Δ) = min_c (a_c + Δ b_c) is concave with margin(lo) = margin(hi) = 0, so
    on each side of 0 it lies above the chord from (0, m0) inside [lo, hi] and
    below its extension outside; with no bound on a side it is monotone there.
    Every line is also above m0 + |Δ|·(least slope on that side), which is what
    keeps the bound growing for huge Δ on a side without a crossing.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        neg = delta < 0
        side = np.where(neg, lo, hi)
        chord = np.where(np.isfinite(side), m0 * np.abs(delta - side) / np.abs(side), m0)
        return np.maximum(chord, m0 + np.abs(delta) * np.where(neg, down, up))


# float32 overflow edges of an L2 normalisation, with a relative guard band on each side.
FLT_MAX = float(np.finfo(np.float32).max)
SQUARE_EDGE = 2.0**64 * (1 + 1e-5)  # |x| above this: x² (and so ‖z'‖) is +Inf in float32
FINITE_EDGE = FLT_MAX * (1 - 1e-5)  # |x| below this: x itself is finite in float32
INF_EDGE = FLT_MAX * (1 + 1e-5)  # |x| above this: x is ±Inf in float32


def overflow_outcome(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every score NaN, every score zero) masks, from bounds on max|z'| before an L2 normalisation.

    z' holding ±Inf or NaN gives ‖z'‖ = Inf or NaN and Inf/Inf = NaN: every cosine
    is NaN (an SDC, non-finite). A finite z' whose square overflows gives ‖z'‖ = Inf
    and z'/Inf = ±0: every score is zero and argmax picks class 0, an SDC unless
    the golden class is 0. Values inside a guard band are left to the float32 path.
    """
    with np.errstate(invalid="ignore"):
        nan = np.isnan(low) | (low > INF_EDGE)
        zero = (low >= SQUARE_EDGE) & (high <= FINITE_EDGE)
    return nan, zero


def overflow_split(site: Site, rows: slice, ks: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(may overflow, surely ±Inf) masks for faults that move one score by Δ (N×K), from `site.reach`.

    Every partial sum of the faulty dot product is within |Δ| + reach of zero, so
    below FINITE_EDGE nothing overflows and the rounding bounds hold. Once the one
    changed term is in, each later addition errs by at most the smaller operand,
    so the score is within 2·reach (and a few roundings) of Δ: beyond INF_EDGE it
    is ±Inf, with Δ's sign. A positive multiplier after the dot (the text head's
    scale, 1/units) overflows the same way. Between the two, float32 decides.
    """
    if site.reach is None:
        raise HardenError(f"site {site.tensor!r} gives no bound on its terms")
    reach = site.reach[rows][:, site.group[ks]]
    mult = np.ones(len(reach)) if site.units is None else 1 / site.units[rows]
    grow = np.maximum(mult, 1.0)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        size = np.abs(delta)
        finite = (size + reach) * grow < FINITE_EDGE
        infinite = (size - 2 * reach) * grow > INF_EDGE
    return ~finite, infinite


def infinite_outcome(positive: np.ndarray, top: np.ndarray, post: str) -> tuple[np.ndarray, np.ndarray]:
    """(SDC, non-finite) when one score becomes +Inf (`positive`) or −Inf and every other keeps its finite
    fault-free value; `top` marks faults in the golden class's score.

    +Inf wins the argmax, and behind a (Log)Softmax makes the row NaN (Inf − Inf), class −1. −Inf loses it,
    an SDC only for the golden class; a Softmax makes it probability 0 (finite), a LogSoftmax keeps −Inf.
    """
    if post:
        return positive | top, positive | (post == "LogSoftmax")
    return np.where(positive, ~top, top), np.ones_like(positive)


def _chunks(size: int, step: int) -> Iterator[np.ndarray]:
    for start in range(0, size, step):
        yield np.arange(start, min(size, start + step))


# Images per block: pruning uses the smallest safe radius within a block, so small blocks prune more.
BLOCK = 128


@dataclass
class _Counts:
    """Per-bit accumulators of one site."""

    width: int
    hits: bool

    def __post_init__(self) -> None:
        z = lambda: np.zeros(self.width, np.int64)  # noqa: E731
        self.faults, self.sdc, self.due, self.hit_faults, self.hit_sdc = z(), z(), z(), z(), z()
        self.recomputed = 0


@dataclass
class _Geometry:
    """Per-image envelope of a site: interval ends, slopes, margins and rounding bounds (N×G or N)."""

    lo: np.ndarray
    hi: np.ndarray
    up: np.ndarray
    down: np.ndarray
    m0: np.ndarray
    tau: np.ndarray
    top1: np.ndarray
    unit: bool = False


def _geometry(site: Site, top1: np.ndarray) -> tuple[_Geometry, np.ndarray]:
    """The site's per-image envelope, and which images sit within rounding of a tie (analysed one by one)."""
    if site.scores is not None:
        return unit_geometry(site, top1)
    lo, hi, up, down = envelope(site.base, top1, site.directions)
    m0 = margin(site.base, top1)
    return _Geometry(lo, hi, up, down, m0, site.tau, top1), m0 <= 2 * site.tau


def unit_edges(scores: np.ndarray, base: np.ndarray, top1: np.ndarray) -> tuple[np.ndarray, ...]:
    """lo, hi (N×C), top, rival (N): a fault that moves score c alone from base[n, c] by Δ changes the top-1
    exactly when Δ < lo or Δ > hi, against the exact fault-free `scores` of the other classes."""
    rows = np.arange(len(top1))
    others = scores.copy()
    others[rows, top1] = -np.inf
    top, rival = scores[rows, top1], others.max(axis=1)
    hi = top[:, None] - base
    lo = np.full_like(hi, -np.inf)
    lo[rows, top1] = rival - base[rows, top1]
    hi[rows, top1] = np.inf
    return lo, hi, top, rival


def unit_geometry(site: Site, top1: np.ndarray) -> tuple[_Geometry, np.ndarray]:
    """The envelope of a site whose faults move one score alone, against the exact fault-free float32 rivals.

    Every other class keeps its fault-free float32 score, so class c ≠ t stays below
    the top-1 t while base_c + Δ < S_t, and t stays on top while base_t + Δ > the
    best other S. Only the faulty score itself is rounded (tau + slack), so the
    decision is one-sided and holds however close S_t and its rival are, except
    behind a Softmax, whose renormalisation may round two leaders within its tie
    band into a tie: those images (returned) are analysed one by one in float32.
    """
    if site.classes is None or not np.array_equal(site.group, site.classes):
        raise HardenError(f"site {site.tensor!r}: fault-free scores given, but its faults do not move one class")
    lo, hi, top, rival = unit_edges(np.asarray(site.scores, np.float64), site.base, top1)
    tie = np.zeros(len(top1)) if site.tie is None else site.tie
    ambiguous = (tie > 0) & (top - rival <= tie)
    none = np.zeros_like(hi)
    return _Geometry(lo, hi, none, none, top - rival, site.tau + tie / 2, top1, unit=True), ambiguous


def analyse_site(site: Site, top1: np.ndarray, fmt: str = "fp32",
                 advance: Callable[[int], object] | None = None) -> ExactSiteResult:
    """Exact SDC/DUE counts per bit for every element × bit × image of one site.

    Images go in blocks; an image whose fault-free margin is itself within
    rounding of a tie (or, for a weight or bias site, within a Softmax's tie
    band) is analysed on its own with every fault in float32, which on a wide
    head takes most of the time: `advance(faults)` is told as each part is
    done, so that a progress bar can show it.
    """
    width = check_format(fmt)
    n = len(top1)
    geo, near_tie = _geometry(site, top1)
    counts = _Counts(width, site.classes is not None)
    radius = _safe_radius(site, geo) if site.weight_delta is not None else None
    if radius is not None and site.clip_free is not None:
        # pruned faults skip the clip check: they must also stay within the clip's own radius
        radius = np.minimum(radius, site.clip_radius) if site.clip_radius is not None else None
    bits = range(width)
    step = max(1, CHUNK_CELLS // BLOCK)
    for start in range(0, n, BLOCK):
        rows = slice(start, min(n, start + BLOCK))
        keep = ~near_tie[rows]
        if keep.any():
            for ks in _chunks(site.size, step):
                _block(site, geo, rows, keep, ks, radius, counts, bits)
        if advance is not None:
            advance(int(keep.sum()) * site.size * width)
    for i in np.flatnonzero(near_tie):
        for ks in _chunks(site.size, step):
            _block(site, geo, slice(i, i + 1), np.ones(1, bool), ks, None, counts, bits, force=True)
            if advance is not None:
                advance(len(ks) * width)
    return ExactSiteResult(
        tensor=site.tensor, role=site.role, layer=site.layer, elements=site.size, images=n, fmt=fmt,
        faults=counts.faults.tolist(), sdc=counts.sdc.tolist(), due=counts.due.tolist(),
        hit_faults=counts.hit_faults.tolist() if counts.hits else None,
        hit_sdc=counts.hit_sdc.tolist() if counts.hits else None, recomputed=counts.recomputed,
    )


def fault_sdc(site: Site, top1: np.ndarray, faults: np.ndarray, fmt: str = "fp32") -> np.ndarray:
    """SDC count over all images of each given (element, bit) fault (M×2), by the same closed form.

    For audits against brute force on a sample of faults of a large model.
    """
    width = check_format(fmt)
    n = len(top1)
    geo, near_tie = _geometry(site, top1)
    out = np.zeros(len(faults), np.int64)
    for i, (k, bit) in enumerate(np.asarray(faults, dtype=np.int64)):
        counts = _Counts(width, False)
        ks = np.array([k])
        for start in range(0, n, BLOCK):
            rows = slice(start, min(n, start + BLOCK))
            if (~near_tie[rows]).any():
                _block(site, geo, rows, ~near_tie[rows], ks, None, counts, [int(bit)])
        for j in np.flatnonzero(near_tie):
            _block(site, geo, slice(j, j + 1), np.ones(1, bool), ks, None, counts, [int(bit)], force=True)
        out[i] = counts.sdc[bit]
    return out


def _block(site: Site, geo: _Geometry, rows: slice, keep: np.ndarray, ks: np.ndarray, radius: np.ndarray | None,
           counts: _Counts, bits: range | list[int], force: bool = False) -> None:
    """Count the faults of elements `ks` × every bit on the images `rows` where `keep`."""
    top1 = geo.top1[rows]
    keep_col = keep[:, None]
    m0_col, tau_col = geo.m0[rows, None], geo.tau[rows, None]
    kept_classes = np.bincount(top1[keep], minlength=site.base.shape[1])
    rho = None
    if radius is not None and site.x_abs is not None and site.col is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = radius[rows][:, site.group[ks]] / site.x_abs[rows][:, site.col[ks]]
        rho = np.where(keep_col, ratio, np.inf).min(axis=0)
    for bit in bits:
        live = ks
        if rho is not None and site.weight_delta is not None:
            small = np.abs(site.weight_delta(ks, bit)) <= rho
            live = ks[~small]
            counts.faults[bit] += int(keep.sum()) * int(small.sum())
            if counts.hits and site.classes is not None:
                counts.hit_faults[bit] += int(kept_classes[site.classes[ks[small]]].sum())
            if not live.size:
                continue
        delta, slack = site.delta(rows, live, bit)
        g = site.group[live]
        lo, hi = geo.lo[rows][:, g], geo.hi[rows][:, g]
        infinite = None
        with np.errstate(invalid="ignore"):
            flips = (delta < lo) | (delta > hi)
            if geo.unit:  # one rounded score against exact rivals
                close = np.minimum(np.abs(delta - lo), np.abs(delta - hi)) <= tau_col + slack
            else:  # rounded scores on both sides of the margin
                bound = _margin_bound(delta, lo, hi, geo.up[rows][:, g], geo.down[rows][:, g], m0_col)
                close = bound <= 2 * (tau_col + slack)
            if geo.unit and site.reach is not None:
                overflow, infinite = overflow_split(site, rows, live, delta)
                unsafe = ~np.isfinite(delta) | ((overflow | close) & ~infinite)
            else:
                unsafe = ~np.isfinite(delta) | (np.abs(delta) > site.limit[live]) | close
        if site.clip_free is not None:
            unsafe |= ~site.clip_free(rows, live, delta)
        if force:
            unsafe[:] = True
        nonfinite = np.zeros_like(flips)
        if infinite is not None and infinite.any():
            s, d = infinite_outcome(delta > 0, site.group[live][None, :] == top1[:, None], site.post)
            flips = np.where(infinite, s, flips)
            nonfinite |= infinite & d
        if site.zmax is not None and not force:
            nan, zero = overflow_outcome(*site.zmax(rows, live, delta))
            if site.nan_to_zero:
                nan, zero = np.zeros_like(nan), zero | nan
            unsafe &= ~(nan | zero)
            flips = np.where(zero, (top1 != 0)[:, None], flips) | nan
            nonfinite |= nan
        unsafe &= keep_col
        flips &= ~unsafe
        if unsafe.any():
            r, c = np.nonzero(unsafe)
            counts.recomputed += len(r)
            for part in _chunks(len(r), 4096):
                logits = site.recompute(r[part] + rows.start, live[c[part]], bit)
                s, d = fault_outcome(logits, top1[r[part]])
                flips[r[part], c[part]] = s
                nonfinite[r[part], c[part]] = d
        flips &= keep_col
        nonfinite &= keep_col
        counts.faults[bit] += int(keep.sum()) * len(live)
        counts.sdc[bit] += int(flips.sum())
        counts.due[bit] += int(nonfinite.sum())
        if counts.hits and site.classes is not None:
            hit = (site.classes[live][None, :] == top1[:, None]) & keep_col
            counts.hit_faults[bit] += int(hit.sum())
            counts.hit_sdc[bit] += int((flips & hit).sum())


def _safe_radius(site: Site, geo: _Geometry) -> np.ndarray:
    """r (N×G): any fault with |δ·x| ≤ r keeps top-1 for that image, beyond any float32 doubt.

    With |Δ| ≤ r ≤ R = min(−lo, hi) the margin is at least m0(1 − r/R) and the
    rounding bound at most 2τ + 2κr, so r < (m0 − 2τ)/(m0/R + 2κ) suffices. Against
    exact rivals (geo.unit) the faulty score is at least R − r from the edge and
    rounds by at most τ + 2κr, so r < (R − τ)/(1 + 2κ) suffices.
    """
    kappa = site.kappa if site.kappa is not None else np.zeros(geo.lo.shape[1])
    reach = np.minimum(-geo.lo, geo.hi)
    tau, m0 = geo.tau[:, None], geo.m0[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if geo.unit:
            r = np.where(reach > tau, 0.99 * (reach - tau) / (1 + 2 * kappa[None, :]), 0.0)
        else:
            r = 0.99 * (m0 - 2 * tau) / (m0 / reach + 2 * kappa[None, :])
            r = np.where((m0 > 2 * tau) & (reach > 0), r, 0.0)
    return np.minimum(np.nan_to_num(r, nan=0.0), site.limit.min() if site.limit.size else np.inf)


def analyse_sites(sites: list[Site], top1: np.ndarray, fmt: str, head: str, policy: str,
                  progress: bool = False) -> ExactResult:
    """Run `analyse_site` over every site and time the whole analysis; with `progress`, a bar on stderr."""
    from tqdm import tqdm

    start = time.perf_counter()
    total = sum(site.size for site in sites) * len(top1) * check_format(fmt)
    with tqdm(total=total, unit="fault", unit_scale=True, desc="exact", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        results = [analyse_site(site, top1, fmt, bar.update) for site in sites]
    return ExactResult(head=head, policy=policy, fmt=fmt, images=len(top1), sites=results,
                       seconds=time.perf_counter() - start)
