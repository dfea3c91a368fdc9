"""`harden data show SPEC`: what a dataset spec resolves to."""

from __future__ import annotations

import argparse
import json

from harden.data import SPEC_HELP, load_dataset


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="inspect datasets by spec")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print count, shape, classes and per-class counts")
    show.add_argument("spec", help=SPEC_HELP)
    show.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many images")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    summary = load_dataset(args.spec, limit=args.limit).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    c, h, w = summary["shape"]  # type: ignore[misc]
    print(f"{summary['spec']}: {summary['count']} images, {c}×{h}×{w}, values in "
          f"[{summary['range'][0]:.3g}, {summary['range'][1]:.3g}], {summary['classes']} classes")  # type: ignore[index]
    for name, count in summary["per_class"].items():  # type: ignore[union-attr]
        print(f"  {count:7d}  {name}")
    for note in summary["notes"]:  # type: ignore[union-attr]
        print(f"  note: {note}")
    return 0
