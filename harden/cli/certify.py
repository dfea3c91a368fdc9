"""`harden certify MODEL [--baseline BASE] --data SPEC [gates] -o REPORT_DIR`: a CI reliability gate.

Exit status: 0 when every gate passes, 3 when a gate fails (each failing gate
is printed), 1 on bad input or a model that cannot be certified.
"""

from __future__ import annotations

import argparse

from harden.data import SPEC_HELP
from harden.fi.bitflip import WIDTH
from harden.fi.config import ENGINES
from harden.graph.model_input import PREPROCESS_HELP

GATE_FAILED = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="reliability report and pass/fail gate (exit 0 pass, 3 gate failed, 1 error)",
                       description="Run fault campaigns on MODEL (and BASELINE), the exact final-layer analysis, "
                                   "and cost measurements; write REPORT_DIR/report.json and report.html; exit 0 "
                                   "when every gate passes, 3 when one fails, 1 on errors.")
    p.add_argument("model", help="the ONNX classifier to certify (e.g. the hardened graph)")
    p.add_argument("--baseline", help="the ONNX classifier it replaces, for improvement factors and overhead")
    p.add_argument("--data", required=True, help=SPEC_HELP)
    p.add_argument("--limit", type=int, default=500, help="evaluation images drawn from --data (default 500)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--preprocess", help=PREPROCESS_HELP)
    p.add_argument("--max-sdc", type=float, help="pass when the UPPER confidence bound of SDC is <= this rate")
    p.add_argument("--sdc-scope", choices=("overall", "layer", "both"), default="both",
                   help="--max-sdc applies to the pooled rate, every layer, or both (default)")
    p.add_argument("--min-improvement", type=float,
                   help="pass when the LOWER bound of baseline SDC / model SDC (overall) is >= this factor")
    p.add_argument("--confidence", type=float, default=0.95, help="interval confidence (default 0.95)")
    p.add_argument("--ci", choices=("wilson", "clopper-pearson"), default="wilson")
    p.add_argument("--layers", default="all", help="all, last, names or re:REGEX (as harden inject)")
    p.add_argument("--kinds", default="activation,weight", help="activation, weight or both (default both)")
    p.add_argument("--injections", type=int, default=1000, help="injections per layer (default 1000)")
    p.add_argument("--margin", type=float, help="choose N per layer by Leveugle et al. for this error margin")
    p.add_argument("--format", dest="fmt", choices=sorted(WIDTH), default=None,
                   help="number format a fault corrupts (default: what each site stores: fp32, fp16, or a quantised "
                        "graph's int8/uint8/int32; fp16, bf16, fp8 and int8 are also emulated on float32 sites)")
    p.add_argument("--clamp", choices=("none", "range"), default="none", help="range policy of the campaigns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--engine", choices=ENGINES, default="cone",
                   help="fault engine of the campaigns (as harden inject)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact final-layer analysis")
    p.add_argument("--latency-runs", type=int, default=30, help="timed runs per latency measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: every CPU), as harden inject; results do not depend on it")
    p.add_argument("--scores", metavar="NAME",
                   help="the class-score output of both models, when they have several (inject's --output)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-o", "--output", required=True, help="REPORT_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from harden.cli.notes import note_model
    from harden.report.certify import CertifyConfig, certify

    config = CertifyConfig(
        model=args.model, data=args.data, output=args.output, baseline=args.baseline, limit=args.limit,
        data_seed=args.data_seed, preprocess=args.preprocess, max_sdc=args.max_sdc, sdc_scope=args.sdc_scope,
        min_improvement=args.min_improvement, confidence=args.confidence, ci=args.ci, layers=args.layers,
        kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), injections=args.injections,
        margin=args.margin, fmt=args.fmt, clamp=args.clamp, seed=args.seed, batch=args.batch, engine=args.engine,
        exact=not args.no_exact, latency_runs=args.latency_runs, threads=args.threads, scores=args.scores,
        progress=not args.no_progress)
    report = certify(config)
    for path in (args.model, args.baseline):  # read once certify has checked the files
        if path:
            note_model(path)
    for model in report.models:
        k = sum(layer.sdc.k for layer in model.campaign.layers)
        n = sum(layer.sdc.n for layer in model.campaign.layers)
        ex = model.exact
        exact = "" if ex is None else f"; exact final layer {100 * ex.total_sdc / max(1, ex.total_faults):.3f}% " \
                                      f"of {ex.total_faults:,} faults"
        print(f"{model.role}: accuracy {100 * model.accuracy.value:.2f}%, sampled SDC {k}/{n}{exact}")
    for imp in report.improvements[:1]:
        print(f"improvement {imp.point:.3g}x [{imp.low:.3g}, {imp.high:.3g}]")
    for gate in report.verdict.gates:
        if not gate.passed:
            print(gate.line())
    verdict = "PASSED" if report.verdict else f"FAILED ({len(report.verdict.failing)} gate(s))"
    print(f"certify: {verdict}; report in {args.output}/report.json and report.html")
    return 0 if report.verdict else GATE_FAILED
