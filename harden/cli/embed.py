"""`harden embed descriptions.json --encoder ID -o embeddings.npz`: class embeddings and their separability."""

from __future__ import annotations

import argparse
from pathlib import Path

from harden.files import refuse_overwrite
from harden.text.descriptions import load_descriptions
from harden.text.embeddings import embed_descriptions
from harden.text.encoders import ENCODER_HELP
from harden.text.similarity import plot_similarity, similarity_summary


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed", help="embed class descriptions into unit class vectors (embeddings.npz)",
        description="Encode each description, normalise it, average per class and renormalise. Prints the "
                    "off-diagonal cosine statistics and writes a class-similarity heatmap.")
    parser.add_argument("descriptions", help="descriptions.json from `harden describe`")
    parser.add_argument("--encoder", default="minilm", help=ENCODER_HELP)
    parser.add_argument("-o", "--output", required=True, help="embeddings.npz to write")
    parser.add_argument("--heatmap", default=None, metavar="PNG",
                        help="class-similarity heatmap (default: OUTPUT with .similarity.png)")
    parser.add_argument("--no-heatmap", action="store_true", help="skip the heatmap")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    refuse_overwrite(args.descriptions, args.output)
    descriptions = load_descriptions(args.descriptions)
    result = embed_descriptions(descriptions, args.encoder)
    summary = similarity_summary(result.matrix, result.classes)
    heatmap = None if args.no_heatmap else Path(args.heatmap or Path(args.output).with_suffix(".similarity.png"))
    if heatmap is not None:
        refuse_overwrite(args.descriptions, heatmap)
        plot_similarity(result.matrix, result.classes, heatmap, title=f"{result.encoder}: cosine between classes")
    result.save(args.output)
    c, e = result.matrix.shape
    print(f"{args.output}: {c} classes × {e} ({result.encoder}), sha256 {result.sha256[:16]}")
    if result.encoder.endswith(":none"):
        print("  note: random open_clip weights; these embeddings are for testing only")
    if summary.mean_off_diagonal is not None:
        a, b = summary.most_similar_pair  # type: ignore[misc]
        print(f"  off-diagonal cosine: min {summary.min_off_diagonal:.3f}, mean {summary.mean_off_diagonal:.3f}, "
              f"max {summary.max_off_diagonal:.3f} ({a} ~ {b})")
    if heatmap is not None:
        print(f"  heatmap: {heatmap}")
    return 0
