"""Certification gates: what passes, decided on confidence bounds, never on point estimates.

- `--max-sdc P` passes when the UPPER bound of the model's SDC rate is <= P:
  overall (the campaign's injections pooled over its layers) and/or for every
  layer (`scope`), so that sampling luck cannot pass a model.
- `--min-improvement X` passes when the LOWER bound of baseline SDC / model SDC
  (stats.ratio_interval: the ratio of the two intervals' far ends, covering at
  least confidence² of the time) is >= X, overall; per-layer improvements for
  layers present in both graphs are reported but do not gate.
"""

from __future__ import annotations

from collections.abc import Sequence

from harden.errors import HardenError
from harden.fi.stats import Rate, binomial_rate, ratio_interval
from harden.fi.summary import CampaignSummary
from harden.report.schema import Gate, Improvement, Verdict

SCOPES = ("overall", "layer", "both")


def pooled_sdc(summary: CampaignSummary) -> Rate:
    """SDC over all of a campaign's injections: the rate for a fault drawn uniformly over them."""
    k = sum(layer.sdc.k for layer in summary.layers)
    n = sum(layer.sdc.n for layer in summary.layers)
    return binomial_rate(k, n, summary.config.confidence, summary.config.ci)  # type: ignore[arg-type]


def improvements(model: CampaignSummary, baseline: CampaignSummary) -> list[Improvement]:
    """Overall improvement, then one per layer site present in both campaigns (graph order of the model)."""
    out = [_improvement("overall", pooled_sdc(baseline), pooled_sdc(model))]
    base_layers = {layer.site: layer for layer in baseline.layers}
    for layer in model.layers:
        if layer.site in base_layers:
            out.append(_improvement(layer.site, base_layers[layer.site].sdc, layer.sdc))
    return out


def _improvement(scope: str, base: Rate, model: Rate) -> Improvement:
    point, low, high = ratio_interval(base, model)
    return Improvement(scope, base, model, point, low, high)


def check_gates(max_sdc: float | None, min_improvement: float | None, scope: str, has_baseline: bool) -> None:
    """Refuse gate arguments that cannot be evaluated (before any campaign runs)."""
    if scope not in SCOPES:
        raise HardenError(f"--sdc-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if max_sdc is not None and not 0 <= max_sdc <= 1:
        raise HardenError(f"--max-sdc is a rate in [0, 1], got {max_sdc}")
    if min_improvement is not None and not has_baseline:
        raise HardenError("--min-improvement needs --baseline")
    if min_improvement is not None and not min_improvement > 0:
        raise HardenError(f"--min-improvement must be positive, got {min_improvement}")


def evaluate(model: CampaignSummary, baseline: CampaignSummary | None, max_sdc: float | None,
             min_improvement: float | None, scope: str = "both") -> tuple[Verdict, list[Improvement]]:
    """The verdict of the requested gates, and the improvements over the baseline (if any)."""
    check_gates(max_sdc, min_improvement, scope, baseline is not None)
    gates: list[Gate] = []
    conf = f"{model.config.confidence:.0%} {model.config.ci}"
    if max_sdc is not None:
        rates: list[tuple[str, Rate]] = []
        if scope in ("overall", "both"):
            rates.append(("overall", pooled_sdc(model)))
        if scope in ("layer", "both"):
            rates += [(layer.site, layer.sdc) for layer in model.layers]
        for name, rate in rates:
            gates.append(Gate(f"max-sdc[{name}]", "<=", max_sdc, rate.high, rate.high <= max_sdc,
                              f"upper {conf} bound of SDC {rate.k}/{rate.n}"))
    found = improvements(model, baseline) if baseline is not None else []
    if min_improvement is not None:
        overall = found[0]
        gates.append(Gate("min-improvement[overall]", ">=", min_improvement, overall.low,
                          overall.low >= min_improvement,
                          f"lower bound of baseline/model SDC ({overall.baseline.k}/{overall.baseline.n} vs "
                          f"{overall.model.k}/{overall.model.n}), covering ≥ {model.config.confidence ** 2:.0%}"))
    return Verdict(gates), found


def failing_lines(verdict: Verdict) -> Sequence[str]:
    """One line per failing gate, for the CLI."""
    return [g.line() for g in verdict.failing]
