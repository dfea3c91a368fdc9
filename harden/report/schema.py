"""report.json: the versioned record of one certification, as dataclasses that round-trip JSON.

A reviewer must be able to tell from this file alone what was certified (model
hashes), how (resolved config, seeds, package versions), what was measured
(per-layer SDC with intervals, exact final-layer fractions, accuracy, cost) and
why the verdict is what it is (each gate's threshold and the bound it compared).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from harden.errors import HardenError
from harden.fi.exact import ExactResult
from harden.fi.stats import Rate
from harden.fi.summary import CampaignSummary
from harden.files import write_json

SCHEMA_VERSION = "harden.report/1"


def _num(x: float | None) -> float | str | None:
    """JSON has no Inf/NaN: encode them as strings so the file stays standard JSON."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _unnum(x: float | str | None) -> float | None:
    return None if x is None else float(x)


@dataclass
class Cost:
    """Deployment cost of one graph: float parameters, multiply-add FLOPs per image, CPU latency."""

    parameters: int
    flops: int
    latency_ms: float
    latency_batch: int
    latency_runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cost:
        return cls(int(d["parameters"]), int(d["flops"]), float(d["latency_ms"]), int(d["latency_batch"]),
                   int(d["latency_runs"]))


@dataclass
class ModelRecord:
    """One certified graph: identity, clean accuracy, campaign, exact final-layer analysis and cost."""

    role: str
    path: str
    sha256: str
    accuracy: Rate
    campaign: CampaignSummary
    campaign_file: str
    cost: Cost
    top2diff: list[float] = field(default_factory=list)
    sdc_top2diff: list[float] = field(default_factory=list)
    exact: ExactResult | None = None
    exact_skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "sha256": self.sha256, "accuracy": self.accuracy.to_dict(),
                "campaign": self.campaign.to_dict(), "campaign_file": self.campaign_file,
                "cost": self.cost.to_dict(), "top2diff": self.top2diff, "sdc_top2diff": self.sdc_top2diff,
                "exact": None if self.exact is None else self.exact.to_dict(), "exact_skipped": self.exact_skipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRecord:
        return cls(d["role"], d["path"], d["sha256"], Rate.from_dict(d["accuracy"]),
                   CampaignSummary.from_dict(d["campaign"]), d["campaign_file"], Cost.from_dict(d["cost"]),
                   [float(v) for v in d["top2diff"]], [float(v) for v in d["sdc_top2diff"]],
                   None if d["exact"] is None else ExactResult.from_dict(d["exact"]), d.get("exact_skipped"))


@dataclass
class Improvement:
    """Baseline SDC rate / model SDC rate with the conservative interval of stats.ratio_interval."""

    scope: str
    baseline: Rate
    model: Rate
    point: float
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"scope": self.scope, "baseline": self.baseline.to_dict(), "model": self.model.to_dict(),
                "point": _num(self.point), "low": _num(self.low), "high": _num(self.high)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Improvement:
        return cls(d["scope"], Rate.from_dict(d["baseline"]), Rate.from_dict(d["model"]),
                   float(_unnum(d["point"])), float(_unnum(d["low"])), float(_unnum(d["high"])))  # type: ignore[arg-type]


@dataclass
class Gate:
    """One pass/fail check: `value` is the bound compared with `threshold` by `op` (<= or >=)."""

    name: str
    op: str
    threshold: float
    value: float
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threshold": _num(self.threshold), "value": _num(self.value)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        return cls(d["name"], d["op"], float(_unnum(d["threshold"])), float(_unnum(d["value"])),  # type: ignore[arg-type]
                   bool(d["passed"]), d["detail"])

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"{mark} {self.name}: {self.value:.4g} {self.op} {self.threshold:.4g} ({self.detail})"


@dataclass
class Verdict:
    """All gates of a certification; truthy exactly when every gate passed (no gates: passed)."""

    gates: list[Gate] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failing(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": bool(self), "gates": [g.to_dict() for g in self.gates]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls([Gate.from_dict(g) for g in d["gates"]])


@dataclass
class Report:
    """Everything `harden certify` measured and decided."""

    config: dict[str, Any]
    environment: dict[str, Any]
    models: list[ModelRecord]
    improvements: list[Improvement]
    overhead: dict[str, float | None]
    verdict: Verdict
    schema: str = SCHEMA_VERSION

    def model(self, role: str) -> ModelRecord:
        for m in self.models:
            if m.role == role:
                return m
        raise HardenError(f"the report has no {role!r} model")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "config": self.config, "environment": self.environment,
                "models": [m.to_dict() for m in self.models],
                "improvements": [i.to_dict() for i in self.improvements],
                "overhead": {k: _num(v) for k, v in self.overhead.items()}, "verdict": self.verdict.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("schema") != SCHEMA_VERSION:
            raise HardenError(f"report schema {d.get('schema')!r} is not {SCHEMA_VERSION!r}")
        return cls(d["config"], d["environment"], [ModelRecord.from_dict(m) for m in d["models"]],
                   [Improvement.from_dict(i) for i in d["improvements"]],
                   {k: _unnum(v) for k, v in d["overhead"].items()}, Verdict.from_dict(d["verdict"]))

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        try:
            with open(path) as handle:
                return cls.from_dict(json.load(handle))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise HardenError(f"{path}: not a readable harden report ({err})") from err
