"""The closed-form exact analysis equals brute-force float32 injection of every fault, in every policy and format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harden.errors import HardenError
from harden.fi.engine import outcome
from harden.fi.exact import ExactResult, analyse_site, analyse_sites, envelope
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_site import RangePolicy
from harden.fi.exact_text import TextHead
from harden.fi.outcome import fault_outcome
from tests.fi.exact_brute import brute_linear, brute_text, text_forwards, text_tensors

POLICIES = ("none", "range", "range-output")


def _linear(seed: int) -> tuple[LinearHead, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    f = np.abs(rng.normal(size=(12, 5))).astype(np.float32)
    f[0, 1] = 0.0  # a zero feature: an Inf weight times it is NaN
    return LinearHead(w, b, "f", "y", "W", "b", "fc"), f


def _text(seed: int, scale: float | None) -> tuple[TextHead, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(4, 5)).astype(np.float32)
    b = (0.1 * rng.normal(size=4)).astype(np.float32)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    f = np.abs(rng.normal(size=(10, 5))).astype(np.float32)
    out = "y" if scale is not None else "cos"
    return TextHead(p, b, w, scale, 1e-12, "f", "z", "cos", out, "P", "pb", "W", "proj", "cls"), f


def _peaks(tensors: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.abs(v).max()) for k, v in tensors.items()}


def _check(sites, top1, fmt, brute) -> int:  # type: ignore[no-untyped-def]
    recomputed = 0
    assert {s.role for s in sites} == set(brute)
    for site in sites:
        r = analyse_site(site, top1, fmt)
        sdc, nf = brute[site.role]
        assert r.sdc == sdc.tolist(), (site.role, r.sdc, sdc.tolist())
        assert r.due == nf.tolist(), (site.role, r.due, nf.tolist())
        assert r.total_faults == site.size * len(top1) * len(r.faults)
        recomputed += r.recomputed
    return recomputed


@pytest.mark.parametrize("policy", POLICIES)
def test_linear_head_equals_brute_force_fp32(policy: str) -> None:
    h, f = _linear(0)
    golden = h.logits(f)
    rp = RangePolicy(policy, _peaks({"f": f, "y": golden}))
    recomputed = _check(h.sites(f, golden, "fp32", rp), golden.argmax(1), "fp32", brute_linear(h, f, "fp32", rp))
    if policy == "none":
        assert recomputed > 0  # the NaN/Inf cases went through the float32 path


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scale", [float(np.float32(math.exp(2.0))), None])
def test_text_head_equals_brute_force_fp32(policy: str, scale: float | None) -> None:
    h, f = _text(1, scale)
    t = text_tensors(h, f)
    rp = RangePolicy(policy, _peaks({"f": f, **t}))
    _check(h.sites(f, t, "fp32", rp), t[h.output].argmax(1), "fp32", brute_text(h, f, "fp32", rp))


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "int8"])
def test_other_formats_equal_brute_force(fmt: str) -> None:
    h, f = _text(3, float(np.float32(math.exp(2.0))))
    t = text_tensors(h, f)
    for policy in ("none", "range-output"):
        rp = RangePolicy(policy, _peaks({"f": f, **t}))
        _check(h.sites(f, t, fmt, rp), t[h.output].argmax(1), fmt, brute_text(h, f, fmt, rp))
    hl, fl = _linear(4)
    golden = hl.logits(fl)
    rp = RangePolicy("range", _peaks({"f": fl, "y": golden}))
    _check(hl.sites(fl, golden, fmt, rp), golden.argmax(1), fmt, brute_linear(hl, fl, fmt, rp))


def test_huge_exponent_flips_in_projection_follow_float32_overflow() -> None:
    """Exponent-MSB flips of P: 1.5 becomes NaN (every cosine NaN), 0.75·2¹²⁸·f makes ‖z‖ overflow
    to Inf (every cosine 0, class 0), both decided in closed form and equal to brute force."""
    h, f = _text(5, 10.0)
    h.proj_weight[0, 0] = np.float32(1.5)
    h.proj_weight[1, 0] = np.float32(0.75)
    f[:, 0] = np.float32(0.5)
    t = text_tensors(h, f)
    rp = RangePolicy("none", {})
    site = h.sites(f, t, "fp32", rp)[0]
    r = analyse_site(site, t[h.output].argmax(1), "fp32")
    sdc, nf = brute_text(h, f, "fp32", rp)["proj_weight"]
    assert r.sdc == sdc.tolist() and r.due == nf.tolist()
    assert r.due[30] > 0 and r.sdc[30] > r.due[30]


def test_envelope_matches_direct_argmax() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(50, 6))
    top1 = base.argmax(1)
    dirs = rng.normal(size=(4, 6))
    lo, hi, _, _ = envelope(base, top1, dirs)
    for delta in (-3.0, -0.5, 0.2, 2.5):
        inside = (delta > lo) & (delta < hi)
        direct = np.stack([(base + delta * d).argmax(1) == top1 for d in dirs], axis=1)
        np.testing.assert_array_equal(inside, direct)


def test_outcome_follows_the_engine_nan_rule() -> None:
    rows = np.array([[1.0, np.nan, 0.5], [np.nan, np.nan, np.nan], [np.inf, 1.0, 0.0]], np.float32)
    golden = np.array([0, 0, 1])
    sdc, nf = fault_outcome(rows, golden)
    assert sdc.tolist() == [False, True, True] and nf.tolist() == [True, True, True]
    cls, engine_nf, _ = outcome(rows, golden)
    assert (cls != golden).tolist() == sdc.tolist() and engine_nf.tolist() == nf.tolist()


def test_hit_class_breakdown_and_round_trip() -> None:
    h, f = _linear(2)
    golden = h.logits(f)
    top1 = golden.argmax(1)
    result = analyse_sites(h.sites(f, golden, "fp32", RangePolicy()), top1, "fp32", "linear", "none")
    weight = result.site("W")
    assert weight.hit_faults is not None and weight.hit_sdc is not None
    # each image's top-1 row of W holds d of the C·d weights
    assert sum(weight.hit_faults) == 32 * f.shape[1] * len(f)
    assert 0 < sum(weight.hit_sdc) <= weight.total_sdc
    assert result.site("f").hit_faults is None
    again = ExactResult.from_dict(result.to_dict())
    assert again.to_dict() == result.to_dict()
    with pytest.raises(HardenError):
        result.site("nope")
    with pytest.raises(HardenError):
        RangePolicy("clip-everything")


def test_fault_sdc_matches_the_per_bit_totals() -> None:
    """The per-fault audit path agrees with the enumeration: summing it over elements gives each bit's count."""
    from harden.fi.exact import fault_sdc

    h, f = _text(6, 10.0)
    t = text_tensors(h, f)
    top1 = t[h.output].argmax(1)
    for site in h.sites(f, t, "fp32", RangePolicy())[:2]:
        total = analyse_site(site, top1, "fp32")
        pairs = np.array([(k, b) for b in (3, 30, 31) for k in range(site.size)])
        per_fault = fault_sdc(site, top1, pairs)
        for i, b in enumerate((3, 30, 31)):
            assert per_fault[i * site.size:(i + 1) * site.size].sum() == total.sdc[b]


@pytest.mark.parametrize("policy", POLICIES)
def test_images_within_rounding_of_a_tie_are_decided_in_closed_form(policy: str) -> None:
    """Two classes with the same weights: every image's margin lies within the float32 rounding bound, which
    once sent every weight and bias fault of it to the float32 path (hours on a 4096-wide head). A weight or
    bias fault moves one score against exact fault-free rivals, so nearly all are still decided in closed
    form, and the counts stay those of brute force.

    One feature, so that a score is fl(fl(f·w) + b) in any order: with more, a faulty score a rounding away
    from its rival depends on the order of the sum, which numpy's float32 path does not share with BLAS
    (the limit exact.py states)."""
    from harden.fi.exact import margin

    rng = np.random.default_rng(8)
    w = np.float32(rng.uniform(0.5, 1.0))
    b = np.float32(rng.normal())
    h = LinearHead(np.array([[w], [w], [w - 1]], np.float32),
                   np.array([b, np.nextafter(b, np.float32(np.inf)), b], np.float32), "f", "y", "W", "b", "fc")
    f = rng.uniform(0.5, 2.0, size=(12, 1)).astype(np.float32)
    golden = h.logits(f)
    rp = RangePolicy(policy, _peaks({"f": f, "y": golden}))
    sites = h.sites(f, golden, "fp32", rp)
    top1 = golden.argmax(1)
    _check(sites, top1, "fp32", brute_linear(h, f, "fp32", rp))
    for site in sites[:2]:
        assert (margin(site.base, top1) <= 2 * site.tau).all()  # the old rule's near ties: every image
        # the old rule sent all of them (range: a bias clamped back to its own value ties exactly, so recomputes)
        assert analyse_site(site, top1, "fp32").recomputed < site.size * len(f) * 32 / 3, site.role


def test_a_softmax_tie_band_is_kept_in_logits_whatever_the_sites_units() -> None:
    """Behind a Softmax, a fault that leaves the golden class within SOFTMAX_TIE (in logits) of the best other
    must go to the float32 path.
    With scale 1 and ‖z‖ ≈ 10⁴, a logit is 10⁴ units of z·W: a band counted in z·W units, as it once was,
    let faults 5e-6 from a tie be decided in closed form."""
    from harden.fi.exact_site import SOFTMAX_TIE, after_softmax, softmax32

    h, f = _text(9, None)
    h.proj_weight *= np.float32(1e4)
    h.proj_bias *= np.float32(1e4)
    z = f[0] @ h.proj_weight.T + h.proj_bias
    zn = z / np.linalg.norm(z)
    other = np.zeros_like(zn)
    other[np.argmin(np.abs(zn))] = 1.0
    other -= (other @ zn) * zn
    h.weight[0] = zn  # image 0: cosine 1 with class 0 and 1 − 5e-6 with class 1
    h.weight[1] = ((zn + np.sqrt(1e-5) * other / np.linalg.norm(other)) / np.sqrt(1 + 1e-5)).astype(np.float32)
    t = text_tensors(h, f)
    logits = t[h.output]
    gap = np.sort(logits[0])[-1] - np.sort(logits[0])[-2]
    assert SOFTMAX_TIE / 4 < gap < SOFTMAX_TIE
    top1 = softmax32(logits).argmax(1)
    rp = RangePolicy()
    forwards = text_forwards(h, f, "fp32", rp)
    for site in h.sites(f, t, "fp32", rp):
        seen: set[tuple[int, int, int]] = set()
        site = after_softmax(_recording(site, seen))
        analyse_site(site, top1, "fp32")
        size, forward = forwards[site.role]
        for bit in range(32):
            for k in range(size):
                with np.errstate(all="ignore"):
                    faulty = np.asarray(forward(k, bit), np.float64)  # type: ignore[operator]
                rival = np.where(np.arange(faulty.shape[1]) == top1[:, None], -np.inf, faulty).max(axis=1)
                # the golden class within the band of the best other decides an SDC; a row of equal scores
                # (‖z'‖ overflowed: every cosine 0) has an exact Softmax
                close = np.flatnonzero(np.isfinite(faulty).all(axis=1) & (np.ptp(faulty, axis=1) > 0)
                                       & (np.abs(faulty[np.arange(len(f)), top1] - rival) <= SOFTMAX_TIE))
                missed = [n for n in close if (n, k, bit) not in seen]
                assert not missed, (site.role, k, bit, missed)


def _recording(site, seen: set[tuple[int, int, int]]):  # type: ignore[no-untyped-def]
    """The site, noting every (image, element, bit) its float32 path is asked for."""
    from dataclasses import replace

    inner = site.recompute

    def recompute(rows: np.ndarray, ks: np.ndarray, bit: int) -> np.ndarray:
        seen.update((int(n), int(k), bit) for n, k in zip(rows, ks))
        return inner(rows, ks, bit)

    return replace(site, recompute=recompute)


@pytest.mark.parametrize("softmax", ["", "Softmax", "LogSoftmax"])
def test_scores_driven_past_float32_max_are_decided_as_infinite(softmax: str) -> None:
    """Features in the thousands: an exponent-MSB flip of a weight drives its score far past float32's
    max, to ±Inf, which once sent every such fault to the float32 path (most of them, on the model zoo's
    ResNet-50 with random weights). They are decided in closed form — +Inf wins, or makes a (Log)Softmax
    row NaN; −Inf loses — and the counts stay those of brute force."""
    from harden.fi.exact_site import after_softmax

    h, f = _linear(10)
    f *= np.float32(2000)
    golden = h.logits(f)
    rp = RangePolicy()
    sites = h.sites(f, golden, "fp32", rp)
    if softmax:
        sites = [after_softmax(s, log=softmax == "LogSoftmax") for s in sites]
    top1 = golden.argmax(1)
    _check(sites, top1, "fp32", brute_linear(h, f, "fp32", rp, softmax))
    weight = sites[0]
    delta, _ = weight.delta(slice(0, len(f)), np.arange(weight.size), 30)
    assert (np.abs(delta) > 3.5e38).mean() > 0.9 and ((delta > 0) & (np.abs(delta) > 3.5e38)).any()
    assert analyse_site(weight, top1, "fp32").recomputed < 0.02 * weight.size * len(f) * 32
