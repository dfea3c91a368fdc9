"""Per-layer results of a campaign, computed from its JSONL file alone.

The summary is derived, never primary: it can always be recomputed from the
records (after a resume, a merge, or with another confidence level).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harden.errors import HardenError
from harden.fi.config import CampaignConfig
from harden.fi.journal import JournalContents, unnum
from harden.fi.stats import Rate, binomial_rate


@dataclass
class LayerResult:
    """One site's outcome: SDC and non-finite rates with intervals, |Δloss|, Top2Diff and a per-bit breakdown."""

    site: str
    kind: str
    node: str
    op_type: str
    elements: int
    injections: int
    sdc: Rate
    nonfinite: Rate
    mean_abs_dloss: float | None
    golden_top2diff: float | None
    by_bit: dict[int, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "node": self.node, "op_type": self.op_type,
                "elements": self.elements, "injections": self.injections, "sdc": self.sdc.to_dict(),
                "nonfinite": self.nonfinite.to_dict(), "mean_abs_dloss": self.mean_abs_dloss,
                "golden_top2diff": self.golden_top2diff,
                "by_bit": {str(b): [k, n] for b, (k, n) in sorted(self.by_bit.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerResult:
        return cls(d["site"], d["kind"], d["node"], d["op_type"], int(d["elements"]), int(d["injections"]),
                   Rate.from_dict(d["sdc"]), Rate.from_dict(d["nonfinite"]), d["mean_abs_dloss"],
                   d["golden_top2diff"], {int(b): (int(v[0]), int(v[1])) for b, v in d["by_bit"].items()})


@dataclass
class CampaignSummary:
    """All layers of a campaign with its provenance; `complete` means every shard is in the file."""

    model_sha256: str
    config: CampaignConfig
    opt_level: str
    packages: dict[str, str | None]
    evaluation: dict[str, int]
    layers: list[LayerResult]
    shards_done: int
    total_shards: int
    seconds: float | None = None
    injections_per_s: float | None = None

    @property
    def complete(self) -> bool:
        return self.shards_done == self.total_shards

    def layer(self, site: str) -> LayerResult:
        for layer in self.layers:
            if site in (layer.site, layer.node):
                return layer
        raise HardenError(f"the campaign has no layer {site!r}")

    def to_dict(self) -> dict[str, Any]:
        from harden.fi.runner import session_levels

        return {"model_sha256": self.model_sha256, "config": self.config.to_dict(), "opt_level": self.opt_level,
                "session_levels": session_levels(self.opt_level, self.config.engine),
                "packages": self.packages, "evaluation": self.evaluation,
                "layers": [layer.to_dict() for layer in self.layers], "shards_done": self.shards_done,
                "total_shards": self.total_shards, "complete": self.complete, "seconds": self.seconds,
                "injections_per_s": self.injections_per_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CampaignSummary:
        return cls(d["model_sha256"], CampaignConfig.from_dict(d["config"]), d["opt_level"], d["packages"],
                   d["evaluation"], [LayerResult.from_dict(x) for x in d["layers"]], int(d["shards_done"]),
                   int(d["total_shards"]), d.get("seconds"), d.get("injections_per_s"))

    def table(self) -> str:
        """The per-layer terminal table."""
        head = ("site", "kind", "op", "n", "SDC %", f"{self.config.confidence:.0%} CI", "non-finite %", "|Δloss|")
        rows = [head]
        for r in self.layers:
            rows.append((r.site, r.kind, r.op_type, str(r.injections), f"{100 * r.sdc.value:.2f}",
                         f"[{100 * r.sdc.low:.2f}, {100 * r.sdc.high:.2f}]", f"{100 * r.nonfinite.value:.2f}",
                         "-" if r.mean_abs_dloss is None else f"{r.mean_abs_dloss:.3g}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                         for row in rows)


def bit_table(summary: CampaignSummary) -> str:
    """Per layer, the bit positions that caused SDCs: 'bit: k/n' (bits never causing one are left out)."""
    lines = []
    for r in summary.layers:
        hits = [f"{b}:{k}/{n}" for b, (k, n) in sorted(r.by_bit.items()) if k]
        lines.append(f"{r.site}: " + (" ".join(hits) if hits else "no SDC"))
    return "\n".join(lines)


def summarise_contents(contents: JournalContents, confidence: float | None = None,
                       ci: str | None = None) -> CampaignSummary:
    """Per-layer results from a parsed journal, with the header's (or the given) interval settings."""
    header = contents.header
    config = CampaignConfig.from_dict(header["config"])
    conf = config.confidence if confidence is None else confidence
    method = config.ci if ci is None else ci
    ev = contents.evaluation
    t2d = ev.top2diff_by_image()
    acc: dict[str, dict[str, Any]] = {s["name"]: {"n": 0, "sdc": 0, "nf": 0, "dl": [], "t2d": [], "bits": {}}
                                      for s in header["sites"]}
    for rec in contents.records():
        a = acc[rec["site"]]
        a["n"] += 1
        a["sdc"] += bool(rec["sdc"])
        a["nf"] += bool(rec["nonfinite"])
        dl = unnum(rec["dloss"])
        if math.isfinite(dl):
            a["dl"].append(dl)
        a["t2d"].append(t2d[rec["image"]])
        for b in rec["bits"]:
            k, n = a["bits"].get(b, (0, 0))
            a["bits"][b] = (k + bool(rec["sdc"]), n + 1)
    layers = []
    for s in header["sites"]:
        a = acc[s["name"]]
        layers.append(LayerResult(
            s["name"], s["kind"], s["node"], s["op_type"], int(s["elements"]), a["n"],
            binomial_rate(a["sdc"], a["n"], conf, method), binomial_rate(a["nf"], a["n"], conf, method),  # type: ignore[arg-type]
            float(np.mean(a["dl"])) if a["dl"] else None, float(np.mean(a["t2d"])) if a["t2d"] else None,
            dict(sorted(a["bits"].items()))))
    return CampaignSummary(header["model_sha256"], config, config.opt_level, header["packages"],
                           {"total": ev.total, "correct": ev.correct, "kept": ev.kept},
                           layers, len(contents.shards), int(header["total_shards"]))


def summarise_jsonl(path: str | os.PathLike[str], confidence: float | None = None,
                    ci: str | None = None) -> CampaignSummary:
    """Per-layer results of the campaign file at `path` (complete shards only)."""
    return summarise_contents(JournalContents(path), confidence, ci)
