"""`certify`: campaigns on the model (and its baseline), exact final-layer analysis, cost, gates, report.

The campaigns run through the injection engine (harden.fi), one resumable JSONL
file per model in REPORT_DIR/campaigns, so an interrupted certification picks
up where it stopped. The exact analysis reads the campaign's own evaluation set
and profiled ranges from that file's header, so exact and sampled numbers
describe the same images under the same range policy and number format.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harden.data import Preprocess
from harden.errors import HardenError
from harden.fi.campaign import inject_dataset
from harden.fi.config import CampaignConfig
from harden.fi.exact_onnx import analyse_model
from harden.fi.faults import FaultModel
from harden.fi.integer_kernel import arithmetic
from harden.fi.journal import JournalContents
from harden.fi.stats import binomial_rate
from harden.files import refuse_overwrite, sha256_file
from harden.graph.model_input import load_inputs, parse_preprocess, select_scores
from harden.graph.onnx_io import load_model
from harden.provenance import environment
from harden.report.cost import measure_cost
from harden.report.gates import check_gates, evaluate
from harden.report.plots import write_plots
from harden.report.render import render_html
from harden.report.schema import ModelRecord, Report


@dataclass
class CertifyConfig:
    """Everything `harden certify` was asked to do, recorded verbatim in report.json."""

    model: str
    data: str
    output: str
    baseline: str | None = None
    limit: int | None = 500
    data_seed: int = 0
    preprocess: str | None = None
    max_sdc: float | None = None
    sdc_scope: str = "both"
    min_improvement: float | None = None
    confidence: float = 0.95
    ci: str = "wilson"
    layers: str = "all"
    kinds: tuple[str, ...] = ("activation", "weight")
    injections: int = 1000
    margin: float | None = None
    fmt: str | None = None  # None: what each model stores (fp32, or fp16 in a float16 graph)
    clamp: str = "none"
    seed: int = 0
    batch: int = 64
    engine: str = "cone"
    exact: bool = True
    latency_runs: int = 30
    threads: int = 0  # CPU threads (0: every CPU); changes speed only
    scores: str | None = None  # the class-score output of both models, when they have several
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    def campaign(self) -> CampaignConfig:
        """The engine config both models' campaigns share."""
        return CampaignConfig(layers=self.layers, kinds=self.kinds, injections=self.injections, margin=self.margin,
                              fault=FaultModel("flip", self.fmt), clamp=self.clamp, seed=self.seed,
                              batch=self.batch, confidence=self.confidence, ci=self.ci, engine=self.engine)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


def certify(config: CertifyConfig) -> Report:
    """Run everything, write REPORT_DIR/{report.json, report.html, *.png, campaigns/}, return the report."""
    out = Path(config.output)
    for source in [config.model, *([config.baseline] if config.baseline else [])]:
        refuse_overwrite(source, out)
        if not Path(source).is_file():
            raise HardenError(f"{source}: no such file")
    campaign = config.campaign()
    preprocess = parse_preprocess(config.preprocess) if config.preprocess else None
    # Gate arguments are validated before any campaign runs, so a typo fails in seconds.
    check_gates(config.max_sdc, config.min_improvement, config.sdc_scope, config.baseline is not None)
    roles = [("model", config.model)] + ([("baseline", config.baseline)] if config.baseline else [])
    records = [_certify_one(role, path, config, campaign, preprocess, out) for role, path in roles]
    baseline = records[1].campaign if len(records) > 1 else None
    verdict, found = evaluate(records[0].campaign, baseline, config.max_sdc, config.min_improvement,
                              config.sdc_scope)
    overhead: dict[str, float | None] = {}
    if len(records) > 1:
        m, b = records[0], records[1]
        overhead = {"parameters_added": float(m.cost.parameters - b.cost.parameters),
                    "parameters_ratio": m.cost.parameters / b.cost.parameters if b.cost.parameters else None,
                    "flops_added": float(m.cost.flops - b.cost.flops),
                    "flops_ratio": m.cost.flops / b.cost.flops if b.cost.flops else None,
                    "latency_ratio": m.cost.latency_ms / b.cost.latency_ms if b.cost.latency_ms else None,
                    "accuracy_change": m.accuracy.value - b.accuracy.value}
    # an int8 model's arithmetic depends on the CPU's kernels (harden.fi.integer_kernel): say which ran
    report = Report(config.to_dict(), {**environment(), "uint8_int8_kernels": arithmetic()}, records, found,
                    overhead, verdict)
    report.save(out / "report.json")
    plots = write_plots(records, out)
    render_html(report, plots, out, out / "report.html")
    return report


def _certify_one(role: str, path: str, config: CertifyConfig, campaign: CampaignConfig,
                 preprocess: Preprocess | None, out: Path) -> ModelRecord:
    jsonl = out / "campaigns" / f"{role}.jsonl"
    summary = inject_dataset(path, config.data, campaign, jsonl, limit=config.limit, data_seed=config.data_seed,
                             preprocess=preprocess, progress=config.progress, threads=config.threads,
                             output=config.scores)
    if not summary.complete:
        raise HardenError(f"the {role} campaign in {jsonl} is incomplete ({summary.shards_done}/"
                          f"{summary.total_shards} shards)")
    contents = JournalContents(jsonl)
    ev = contents.evaluation
    top2diff = ev.top2diff_by_image()
    sdc_t2d = [top2diff[int(r["image"])] for r in contents.records() if r["sdc"]]
    model = select_scores(load_model(path), config.scores)
    inputs, _ = load_inputs(model, config.data, config.limit, config.data_seed, preprocess)
    exact = None
    skipped = None
    if config.exact:
        try:
            exact = analyse_model(model, inputs[np.asarray(ev.ids, dtype=np.int64)], policy=config.clamp,
                                  # unset only where sites store different types (a quantised graph, which
                                  # the analysis refuses with its reason)
                                  fmt=summary.config.fault.fmt or "fp32", ranges=ev.ranges, profile_inputs=inputs,
                                  batch=config.batch, threads=config.threads, progress=config.progress)
        except HardenError as err:
            skipped = str(err)
    else:
        skipped = "disabled with --no-exact"
    return ModelRecord(role=role, path=os.fspath(path), sha256=sha256_file(path),
                       accuracy=binomial_rate(ev.correct, ev.total, config.confidence,
                                              config.ci),  # type: ignore[arg-type]
                       campaign=summary, campaign_file=os.fspath(jsonl.relative_to(out)),
                       cost=measure_cost(model, inputs[:1], runs=config.latency_runs),
                       top2diff=list(ev.top2diff), sdc_top2diff=sdc_t2d, exact=exact, exact_skipped=skipped)
