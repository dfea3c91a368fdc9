"""The paper-style comparison table, computed from certification reports.

The "final layer" of each model is its classifier head: every site whose node
lies downstream of the features tensor that feeds the classifier (the
baseline's Linear layer; the text head's projection, normalisation and cosine
layers). It is found in the graph, not by name, because exporters number
weights differently in every model. Rates over a set of layers are pooled: the
SDC probability of one fault drawn uniformly over those layers' injections.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.exact_onnx import locate_head
from harden.fi.graphinfo import named_copy
from harden.fi.stats import Rate, binomial_rate, ratio_interval
from harden.fi.summary import CampaignSummary
from harden.graph.locate import locate_classifier
from harden.graph.onnx_io import load_model
from harden.report.schema import Report


def head_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes downstream of the classifier's input features."""
    try:
        features = locate_head(model).input
    except HardenError:
        features = locate_classifier(model).features
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: set[str] = set()
    frontier = [features]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in found:
                found.add(node.name)
                frontier.extend(node.output)
    return found


def head_sites(summary: CampaignSummary, model: onnx.ModelProto) -> list[str]:
    """The campaign's sites that belong to the classifier head of `model`."""
    nodes = head_nodes(named_copy(model))
    return [layer.site for layer in summary.layers if layer.node in nodes]


def pooled(summary: CampaignSummary, sites: list[str]) -> Rate:
    """SDC pooled over the injections of `sites`."""
    chosen = [layer for layer in summary.layers if layer.site in set(sites)]
    k, n = sum(layer.sdc.k for layer in chosen), sum(layer.sdc.n for layer in chosen)
    return binomial_rate(k, n, summary.config.confidence, summary.config.ci)  # type: ignore[arg-type]


def _improvement(base: Rate, model: Rate) -> dict[str, float | None]:
    point, low, high = ratio_interval(base, model)
    return {"point": _finite(point), "low": _finite(low), "high": _finite(high)}


def _finite(x: float) -> float | None:
    return None if math.isinf(x) or math.isnan(x) else float(x)


def comparison_row(name: str, report: Report) -> dict[str, Any]:
    """One row: accuracy, final-layer and overall SDC with improvements, exact head fractions, Top2Diff."""
    model, base = report.model("model"), report.model("baseline")
    m_head = head_sites(model.campaign, load_model(model.path))
    b_head = head_sites(base.campaign, load_model(base.path))
    m_last, b_last = pooled(model.campaign, m_head), pooled(base.campaign, b_head)
    m_all, b_all = pooled(model.campaign, [x.site for x in model.campaign.layers]), \
        pooled(base.campaign, [x.site for x in base.campaign.layers])
    exact = {}
    if model.exact is not None and base.exact is not None:
        m_frac = model.exact.total_sdc / max(1, model.exact.total_faults)
        b_frac = base.exact.total_sdc / max(1, base.exact.total_faults)
        exact = {"baseline": b_frac, "model": m_frac, "faults_baseline": base.exact.total_faults,
                 "faults_model": model.exact.total_faults,
                 "improvement": _finite(b_frac / m_frac) if m_frac > 0 else None}
    return {
        "name": name,
        "clamp": report.config.get("clamp", "none"),
        "accuracy": {"baseline": base.accuracy.value, "model": model.accuracy.value},
        "final_layer": {"baseline": b_last.to_dict(), "model": m_last.to_dict(),
                        "improvement": _improvement(b_last, m_last), "sites_baseline": b_head,
                        "sites_model": m_head},
        "overall": {"baseline": b_all.to_dict(), "model": m_all.to_dict(), "improvement": _improvement(b_all, m_all)},
        "exact_final_layer": exact,
        "top2diff_mean": {"baseline": float(np.mean(base.top2diff)) if base.top2diff else None,
                          "model": float(np.mean(model.top2diff)) if model.top2diff else None},
    }


def comparison_rows(reports: dict[str, str]) -> list[dict[str, Any]]:
    return [comparison_row(name, Report.load(path)) for name, path in reports.items()]


def _x(imp: dict[str, float | None]) -> str:
    def f(v: float | None) -> str:
        return "∞" if v is None else f"{v:.2f}"
    return f"{f(imp['point'])}x [{f(imp['low'])}, {f(imp['high'])}]"


def _pct(rate: dict[str, Any]) -> str:
    return f"{100 * rate['value']:.2f}%"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The README/terminal table; one line per (head, protocol)."""
    lines = [
        "| comparison | clamp | acc. baseline | acc. model | final-layer SDC baseline → model | final-layer improvement "
        "(95% CI) | exact final-layer SDC baseline → model | overall SDC baseline → model | overall improvement "
        "(95% CI) | Top2Diff baseline / model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ex = r["exact_final_layer"]
        ratio = "∞" if ex and ex["improvement"] is None else f"{ex['improvement']:.2f}" if ex else ""
        exact = f"{100 * ex['baseline']:.3f}% → {100 * ex['model']:.3f}% ({ratio}x)" if ex else "n/a"
        t2d = r["top2diff_mean"]
        lines.append(
            f"| {r['name'].split('-clamp-')[0].replace('-vs-', ' vs ')} | {r['clamp']} | {100 * r['accuracy']['baseline']:.2f}% | "
            f"{100 * r['accuracy']['model']:.2f}% | {_pct(r['final_layer']['baseline'])} → "
            f"{_pct(r['final_layer']['model'])} | {_x(r['final_layer']['improvement'])} | {exact} | "
            f"{_pct(r['overall']['baseline'])} → {_pct(r['overall']['model'])} | {_x(r['overall']['improvement'])} | "
            f"{t2d['baseline']:.1f} / {t2d['model']:.1f} |")
    return "\n".join(lines)
