"""Confidence intervals and sample sizes against published values."""

import math

import pytest

from harden.errors import HardenError
from harden.fi.stats import binomial_rate, leveugle_sample_size, ratio_interval


def test_wilson_matches_the_textbook_value() -> None:
    # Wilson 95% interval for 10/100 is (0.0552, 0.1744) (Newcombe 1998, table I style check).
    r = binomial_rate(10, 100)
    assert r.value == 0.1 and r.low == pytest.approx(0.0552, abs=1e-3) and r.high == pytest.approx(0.1744, abs=1e-3)


def test_clopper_pearson_is_wider_and_zero_events() -> None:
    w, cp = binomial_rate(0, 50), binomial_rate(0, 50, method="clopper-pearson")
    assert w.low == 0.0 and cp.low == 0.0
    assert cp.high == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-6)  # the exact bound for k = 0
    assert binomial_rate(5, 50, method="clopper-pearson").high > binomial_rate(5, 50).high


def test_leveugle_sample_size() -> None:
    # An infinite population with e = 1%, 95% confidence, p = 0.5 gives the classic 9,604.
    assert leveugle_sample_size(10**12, 0.01) == 9604
    assert leveugle_sample_size(100, 0.01) <= 100  # never more than the population
    with pytest.raises(HardenError):
        leveugle_sample_size(100, 1.5)


def test_ratio_interval() -> None:
    base, hard = binomial_rate(50, 100), binomial_rate(10, 100)
    point, low, high = ratio_interval(base, hard)
    assert point == pytest.approx(5.0) and low < 5.0 < high
    assert math.isinf(ratio_interval(base, binomial_rate(0, 100))[0])


def test_bad_counts() -> None:
    with pytest.raises(HardenError):
        binomial_rate(5, 3)
    with pytest.raises(HardenError):
        binomial_rate(1, 3, confidence=1.0)
