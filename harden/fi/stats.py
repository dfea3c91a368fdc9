"""Binomial confidence intervals and campaign sample sizes.

An SDC rate from a fault campaign is a binomial proportion; a reliability claim
is only as good as its interval. Intervals come from scipy's binomial machinery
(scipy arrives with scikit-learn) rather than hand-written approximations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from harden.errors import HardenError

Method = Literal["wilson", "clopper-pearson"]


@dataclass(frozen=True)
class Rate:
    """k events out of n trials, with a two-sided confidence interval."""

    k: int
    n: int
    low: float
    high: float
    confidence: float
    method: str

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Rate:
        return cls(**{k: data[k] for k in ("k", "n", "low", "high", "confidence", "method")})  # type: ignore[arg-type]


def binomial_rate(k: int, n: int, confidence: float = 0.95, method: Method = "wilson") -> Rate:
    """The proportion k/n with a Wilson or Clopper-Pearson (exact) interval."""
    if not 0 < confidence < 1:
        raise HardenError(f"confidence must be in (0, 1), got {confidence}")
    if n < 0 or not 0 <= k <= max(n, 0):
        raise HardenError(f"invalid binomial counts k={k}, n={n}")
    if n == 0:
        return Rate(0, 0, 0.0, 1.0, confidence, method)
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson" if method == "wilson" else "exact"
    )
    return Rate(int(k), int(n), float(ci.low), float(ci.high), confidence, method)


def ratio_interval(base: Rate, hard: Rate) -> tuple[float, float, float]:
    """Reliability improvement base/hard with a conservative interval from the two CIs.

    The interval divides the extreme ends of the two intervals, which covers the
    ratio at (at least) the product of the two confidences. A zero hardened rate
    gives an infinite point estimate and upper bound, reported as such.
    """
    point = base.value / hard.value if hard.value > 0 else math.inf
    low = base.low / hard.high if hard.high > 0 else math.inf
    high = base.high / hard.low if hard.low > 0 else math.inf
    return point, low, high


def leveugle_sample_size(population: int, margin: float, confidence: float = 0.95, p: float = 0.5) -> int:
    """Injections needed for error margin `margin` (Leveugle et al., DATE 2009).

    n = N / (1 + e² (N − 1) / (t² p (1 − p))), with t the normal quantile of the
    confidence and p = 0.5 the worst case. N is the fault population
    (elements × bits × images for a layer).
    """
    if not 0 < margin < 1:
        raise HardenError(f"--margin must be in (0, 1), got {margin}")
    if population <= 0:
        raise HardenError("fault population must be positive")
    from scipy.stats import norm

    t = float(norm.ppf(0.5 + confidence / 2))
    n = population / (1 + margin**2 * (population - 1) / (t**2 * p * (1 - p)))
    return int(math.ceil(n))
