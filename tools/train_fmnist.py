"""Reproduce the Fashion-MNIST fine-tuning numbers: tinyresnet with baseline, text (and random) heads.

    nice .venv/bin/python tools/train_fmnist.py --out runs/fmnist --epochs 5 --threads 1

Steps: class embeddings from the shipped descriptions (harden/vocab/fashion-mnist.descriptions.json,
MiniLM, exactly what `harden embed` writes), then `finetune` per head on the full 60k training set with
held-out evaluation on the 10k test set, then `export_onnx` of each checkpoint. Existing checkpoints of
the same config are reused (or continued), so the script can be re-run cheaply. Prints each head's test
accuracy and training wall time and writes them to OUT/results.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harden.files import write_json  # noqa: E402
from harden.train.config import FinetuneConfig  # noqa: E402
from harden.train.export import export_onnx  # noqa: E402
from harden.train.finetune import finetune  # noqa: E402

DESCRIPTIONS = REPO / "harden" / "vocab" / "fashion-mnist.descriptions.json"


def make_embeddings(path: Path) -> None:
    """embeddings.npz from the shipped descriptions with the offline MiniLM encoder."""
    from harden.text.descriptions import load_descriptions
    from harden.text.embeddings import embed_descriptions

    if not path.exists():
        embed_descriptions(load_descriptions(DESCRIPTIONS), "minilm").save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fmnist")
    parser.add_argument("--heads", nargs="+", default=["baseline", "text"], choices=["baseline", "text", "random"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="train on a subset (default: all 60k)")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy shared CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emb = out / "embeddings.npz"
    make_embeddings(emb)
    rows = []
    for head in args.heads:
        config = FinetuneConfig(
            arch="tinyresnet", data="fashion-mnist:train", output=str(out / f"tinyresnet-{head}.pt"), head=head,
            embeddings=None if head == "baseline" else str(emb), epochs=args.epochs, limit=args.limit,
            threads=args.threads, seed=args.seed, progress=sys.stderr.isatty())
        tick = time.perf_counter()
        result = finetune(config, reuse=True, log=print)
        row = {"head": head, "test_acc": result.final_eval_acc, "epochs": len(result.metrics),
               "train_wall_s": round(result.wall_seconds, 1), "this_call_s": round(time.perf_counter() - tick, 1),
               "reused": result.reused, "parameters": result.num_parameters,
               "per_epoch_acc": [m.eval_acc for m in result.metrics], "checkpoint": result.checkpoint}
        if not args.no_export:
            exported = export_onnx(result.checkpoint, out / f"tinyresnet-{head}.onnx")
            row.update(onnx=exported.model, head_npz=exported.head_params, ort_max_abs_diff=exported.max_abs_diff)
        rows.append(row)
        print(f"[{head}] test accuracy {row['test_acc']:.4f} after {row['epochs']} epochs, "
              f"training wall time {row['train_wall_s']}s")
    write_json(out / "results.json", rows)
    print("\nhead      test_acc  epochs  train_wall_s")
    for row in rows:
        print(f"{row['head']:<9} {row['test_acc']:.4f}    {row['epochs']:<6}  {row['train_wall_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
