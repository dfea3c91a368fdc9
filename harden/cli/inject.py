"""`harden inject MODEL --data SPEC --out campaign.jsonl`: a fault-injection campaign on ONNX Runtime.

Also `harden inject MODEL --list-sites` and `harden inject --merge PART... --out merged.jsonl`.
"""

from __future__ import annotations

import argparse
import json

from harden.cli.notes import note_model
from harden.data import SPEC_HELP
from harden.errors import HardenError
from harden.fi.bitflip import WIDTH
from harden.fi.config import ENGINES, CampaignConfig, parse_shard
from harden.fi.faults import MODELS, FaultModel, parse_bits
from harden.fi.nodes import NODE_LEVEL
from harden.graph.model_input import PREPROCESS_HELP, parse_preprocess
from harden.graph.ort import OPT_LEVELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject", help="bit-flip campaign on ONNX Runtime: per-layer SDC rates with intervals",
                       description="Inject faults into activations and weights of an ONNX classifier and report "
                                   "per-layer SDC rates with binomial confidence intervals.")
    p.add_argument("model", nargs="?", help="ONNX classifier (class scores N×C, or N×C×1×1)")
    p.add_argument("--output", help="the class-score output, when the model has several")
    p.add_argument("--list-sites", action="store_true", help="print the fault sites with shapes and element counts")
    p.add_argument("--all-tensors", action="store_true", help="every float tensor is an activation site")
    p.add_argument("--data", help=SPEC_HELP)
    p.add_argument("--limit", type=int, default=500, help="evaluation images drawn from --data (default 500)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--profile-data", help="profiling set for ranges (default: the evaluation images)")
    p.add_argument("--profile-limit", type=int, default=None)
    p.add_argument("--preprocess", help=PREPROCESS_HELP)
    p.add_argument("--layers", default="all", help="all, last, names (site/tensor/node) or re:REGEX, comma-separated")
    p.add_argument("--kinds", default="activation,weight", help="activation, weight or both (default both)")
    p.add_argument("--injections", type=int, default=1000, help="injections per layer (default 1000)")
    p.add_argument("--margin", type=float, help="choose N per layer by Leveugle et al. for this error margin")
    p.add_argument("--fault", choices=MODELS, default="flip",
                   help="fault model (default flip); random: uniform in ± the site's range, stored in --format")
    p.add_argument("--bits", help="bit positions: all (default), 30, 23-30 or 0,7,31")
    p.add_argument("--flips", type=int, default=1, help="distinct bits per fault (k-bit flips)")
    p.add_argument("--format", dest="fmt", choices=sorted(WIDTH), default=None,
                   help="number format a fault corrupts (default: what each site stores: fp32, fp16, or a quantised "
                        "graph's int8/uint8/int32; fp16, bf16, fp8 and int8 are also emulated on float32 sites)")
    p.add_argument("--clamp", choices=("none", "range"), default="none",
                   help="range: clamp NaN/Inf/out-of-range faulty values to ± the profiled max "
                        "(weights: ± the tensor's max |w|)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per prefix run and faults per suffix run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: every CPU): that many runs at once, each on one ONNX "
                        "Runtime thread; results do not depend on it")
    p.add_argument("--cache-mb", type=float, default=1024.0,
                   help="memory for cached fault-free tensors (default 1024 MiB; fewer images per block if needed)")
    p.add_argument("--provider", action="append", help="ONNX Runtime provider (repeatable; default CPU)")
    p.add_argument("--engine", choices=ENGINES, default="cone",
                   help="cone (default) recomputes, node by node, only what a fault reaches: an activation "
                        "fault's windows, a weight fault's layer output onwards; suffix reruns the whole "
                        "downstream graph at --opt-level")
    p.add_argument("--opt-level", choices=sorted(OPT_LEVELS), default="disable",
                   help="graph optimisation level of the suffix engine (--engine suffix, and shared weights and "
                        "folded tensors, which rerun the whole model)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--ci", choices=("wilson", "clopper-pearson"), default="wilson")
    p.add_argument("--shard", help="run part i of n: i/n")
    p.add_argument("--merge", nargs="+", metavar="PART", help="merge --shard parts into --out")
    p.add_argument("--out", help="campaign JSONL (resumed when it holds the same campaign)")
    p.add_argument("--summary", help="summary JSON (default: OUT with .summary.json)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--by-bit", action="store_true", help="also print SDCs by bit position per layer")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from harden.fi.campaign import inject_dataset, merge_files, sites_of_file
    from harden.fi.sites import format_sites

    if args.merge:
        if not args.out:
            raise HardenError("--merge needs --out")
        summary = merge_files(args.merge, args.out, args.summary)
    elif args.list_sites:
        if not args.model:
            raise HardenError("--list-sites needs a MODEL")
        prep = parse_preprocess(args.preprocess) if args.preprocess else None
        print(format_sites(sites_of_file(args.model, args.all_tensors, args.data, prep, args.output)))
        note_model(args.model)
        return 0
    else:
        if not args.model or not args.data or not args.out:
            raise HardenError("a campaign needs MODEL, --data and --out")
        config = CampaignConfig(
            layers=args.layers, kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()),
            injections=args.injections, margin=args.margin,
            fault=FaultModel(args.fault, args.fmt, parse_bits(args.bits), args.flips), clamp=args.clamp,
            seed=args.seed, batch=args.batch, cache_mb=args.cache_mb, providers=tuple(args.provider or ["CPUExecutionProvider"]),
            opt_level=args.opt_level, confidence=args.confidence, ci=args.ci, all_tensors=args.all_tensors,
            shard=parse_shard(args.shard), engine=args.engine)
        summary = inject_dataset(args.model, args.data, config, args.out, limit=args.limit,
                                 data_seed=args.data_seed, profile=args.profile_data,
                                 profile_limit=args.profile_limit,
                                 preprocess=parse_preprocess(args.preprocess) if args.preprocess else None,
                                 summary_path=args.summary, progress=not args.no_progress, fresh=args.fresh,
                                 threads=args.threads, output=args.output)
        note_model(args.model)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    ev = summary.evaluation
    engine = (f"cone engine (node by node at ORT level {NODE_LEVEL}; whole-model sites at level "
              f"{summary.opt_level})" if summary.config.engine == "cone" else f"suffix engine at level {summary.opt_level}")
    print(f"images: {ev['kept']} kept of {ev['total']} ({ev['correct']} correct); {engine}; "
          f"{summary.config.fault.kind} {summary.config.fault.fmt or 'in each site’s own format'}; "
          f"shards {summary.shards_done}/{summary.total_shards}")
    print(summary.table())
    if args.by_bit:
        from harden.fi.summary import bit_table

        print(bit_table(summary))
    if summary.injections_per_s:
        print(f"{summary.injections_per_s:.0f} injections/s")
    return 0
