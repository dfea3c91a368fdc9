"""Reproduce the zoo path on Fashion-MNIST: a baseline ONNX model, hardened by `harden convert`.

1. Train a baseline (linear head) tinyresnet with `harden finetune --head baseline`
   and export it with `harden export` (skipped with --baseline MODEL.onnx).
2. Class embeddings: --embeddings E.npz, or `harden describe --offline` (the
   project's built-in Fashion-MNIST descriptions) then `harden embed` (MiniLM).
3. `harden convert` on the baseline ONNX file alone, evaluated on fashion-mnist:test.

Prints and writes (OUT/results.json) the original and hardened accuracy, their
top-1 agreement, the exact commands and wall times. Every step is seeded.

    .venv/bin/python tools/convert_fmnist.py --out runs/convert_fmnist
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HARDEN = [sys.executable, "-m", "harden"]


def run(cmd: list[str], log: list[dict[str, object]]) -> str:
    """Run one harden command, echo it, record its wall time; stop on failure."""
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    log.append({"command": shlex.join(cmd), "seconds": seconds, "returncode": proc.returncode})
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {shlex.join(cmd)}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/convert_fmnist", help="working folder")
    parser.add_argument("--baseline", help="an existing baseline ONNX model (skips finetune/export)")
    parser.add_argument("--embeddings", help="embeddings.npz from `harden embed`")
    parser.add_argument("--train-limit", type=int, default=12000, help="baseline training images")
    parser.add_argument("--epochs", type=int, default=2, help="baseline epochs")
    parser.add_argument("--convert-limit", type=int, default=20000, help="images for head training in convert")
    parser.add_argument("--steps", type=int, default=400, help="head training steps in convert")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict[str, object]] = []
    baseline = Path(args.baseline) if args.baseline else out / "baseline.onnx"
    if not args.baseline:
        checkpoint = out / "baseline.pt"
        run([*HARDEN, "finetune", "--arch", "tinyresnet", "--head", "baseline", "--data", "fashion-mnist:train",
             "--eval-data", "fashion-mnist:test", "--limit", str(args.train_limit), "--eval-limit", "2000",
             "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads),
             "--no-progress", "-o", str(checkpoint)], log)
        run([*HARDEN, "export", str(checkpoint), "-o", str(baseline)], log)
    embeddings = Path(args.embeddings) if args.embeddings else out / "embeddings.npz"
    if not args.embeddings:
        descriptions = out / "descriptions.json"
        run([*HARDEN, "describe", "--classes", "builtin:fashion-mnist", "--offline", "-o", str(descriptions)], log)
        run([*HARDEN, "embed", str(descriptions), "-o", str(embeddings), "--no-heatmap"], log)
    hardened = out / "hardened.onnx"
    stdout = run([*HARDEN, "convert", str(baseline), "--data", "fashion-mnist:train", "--limit",
                  str(args.convert_limit), "--eval", "fashion-mnist:test", "--embeddings", str(embeddings),
                  "--steps", str(args.steps), "--seed", str(args.seed), "-o", str(hardened), "--json"], log)
    result = json.loads(stdout)
    summary = {
        "original_accuracy": result["original_accuracy"], "hardened_accuracy": result["hardened_accuracy"],
        "agreement": result["agreement"], "eval": f"{result['eval_spec']} ({result['eval_images']} images)",
        "convert_seconds": result["seconds"], "commands": log, "convert": result,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    delta = 100 * (result["hardened_accuracy"] - result["original_accuracy"])
    print(f"\noriginal {100 * result['original_accuracy']:.2f}%  hardened {100 * result['hardened_accuracy']:.2f}%  "
          f"(Δ {delta:+.2f} points)  agreement {100 * result['agreement']:.2f}%  "
          f"convert wall time {result['seconds']:.1f} s")
    return 0 if abs(delta) <= 1.0 else 2


if __name__ == "__main__":
    raise SystemExit(main())
