"""Gates decide on confidence bounds: a point estimate below the limit is not enough to pass."""

from __future__ import annotations

import math

import pytest

from harden.errors import HardenError
from harden.fi.config import CampaignConfig
from harden.fi.stats import binomial_rate
from harden.fi.summary import CampaignSummary, LayerResult
from harden.report.gates import evaluate, pooled_sdc
from harden.report.schema import Gate, Verdict


def _summary(counts: dict[str, tuple[int, int]]) -> CampaignSummary:
    layers = [LayerResult(site, "activation", site, "Gemm", 10, n, binomial_rate(k, n), binomial_rate(0, n), None,
                          None, {}) for site, (k, n) in counts.items()]
    return CampaignSummary("0" * 64, CampaignConfig(), "disable", {}, {"total": 10, "correct": 9, "kept": 9},
                           layers, 1, 1)


def test_max_sdc_uses_the_upper_bound_overall_and_per_layer() -> None:
    model = _summary({"a": (5, 1000), "b": (30, 1000)})
    verdict, _ = evaluate(model, None, max_sdc=0.02, min_improvement=None)
    names = {g.name: g for g in verdict.gates}
    assert set(names) == {"max-sdc[overall]", "max-sdc[a]", "max-sdc[b]"}
    assert names["max-sdc[a]"].passed and not names["max-sdc[b]"].passed
    assert not verdict and "max-sdc[b]" in [g.name for g in verdict.failing]
    # 35/2000 = 1.75% is below 2%, but its upper bound is not: the overall gate fails.
    assert pooled_sdc(model).value < 0.02 < pooled_sdc(model).high
    assert not names["max-sdc[overall]"].passed
    only_overall, _ = evaluate(model, None, max_sdc=0.03, min_improvement=None, scope="overall")
    assert [g.name for g in only_overall.gates] == ["max-sdc[overall]"] and bool(only_overall)


def test_min_improvement_uses_the_lower_bound_of_the_ratio() -> None:
    base = _summary({"a": (100, 1000)})
    model = _summary({"a": (20, 1000)})
    verdict, found = evaluate(model, base, max_sdc=None, min_improvement=3.0)
    assert found[0].scope == "overall" and found[0].point == pytest.approx(5.0)
    assert [i.scope for i in found] == ["overall", "a"]
    gate = verdict.gates[0]
    assert gate.value == pytest.approx(found[0].low) and found[0].low < 5.0
    assert bool(verdict) == (found[0].low >= 3.0)
    strict, _ = evaluate(model, base, max_sdc=None, min_improvement=5.0)
    assert not strict  # the point estimate is 5 but the lower bound is below it
    zero, found0 = evaluate(_summary({"a": (0, 1000)}), base, max_sdc=None, min_improvement=2.0)
    assert math.isinf(found0[0].point) and bool(zero)


def test_bad_gate_arguments_are_refused() -> None:
    model = _summary({"a": (1, 10)})
    with pytest.raises(HardenError, match="baseline"):
        evaluate(model, None, None, 2.0)
    with pytest.raises(HardenError):
        evaluate(model, None, 1.5, None)
    with pytest.raises(HardenError):
        evaluate(model, None, 0.1, None, scope="some")


def test_verdict_truth_is_all_gates_passed() -> None:
    ok = Gate("g1", "<=", 0.1, 0.05, True, "")
    bad = Gate("g2", ">=", 2.0, 1.0, False, "")
    assert Verdict([]) and Verdict([ok]) and not Verdict([ok, bad])
    assert Verdict([ok, bad]).failing == [bad]
    assert Verdict.from_dict(Verdict([ok, bad]).to_dict()) == Verdict([ok, bad])
