"""The heavier reproduction behind the README's results: several seeds, the prompt ablation and Lite0.

    .venv/bin/python tools/reproduce.py --seeds 0 1 2 --heads text random templates [--full] --out runs/reproduce

Each seed is one `harden demo` work folder (runs/reproduce/seed-N), so finished stages are reused
and a killed run continues. Prints, per comparison and clamp protocol, the final-layer and overall
improvement of every seed and their mean, and writes OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harden.demo import DemoConfig, run_demo  # noqa: E402
from harden.files import atomic_open, write_json  # noqa: E402


def _fmt(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None]
    each = ", ".join("∞" if v is None else f"{v:.2f}" for v in values)
    mean = f"{statistics.mean(finite):.2f}" if finite else "∞"
    return f"{mean} ({each})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=["text", "random", "templates"])
    parser.add_argument("--full", action="store_true", help="add EfficientNet-Lite0 (baseline and text head)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=0, help="0: the whole training set")
    parser.add_argument("--injections", type=int, default=300)
    parser.add_argument("--certify-limit", type=int, default=500)
    args = parser.parse_args()

    by_key: dict[tuple[str, str], dict[str, list]] = {}
    for seed in args.seeds:
        config = DemoConfig(workdir=f"{args.out}/seed-{seed}", heads=tuple(args.heads), full=args.full, seed=seed,
                            epochs=args.epochs, train_limit=args.train_limit or None, injections=args.injections,
                            certify_limit=args.certify_limit, progress=False)
        result = run_demo(config, log=lambda line, s=seed: print(f"[seed {s}] {line}", flush=True))
        for row in result.rows:
            key = (row["name"].split("-clamp-")[0], row["clamp"])
            acc = by_key.setdefault(key, {"final": [], "overall": [], "exact": [], "acc_delta": []})
            acc["final"].append(row["final_layer"]["improvement"]["point"])
            acc["overall"].append(row["overall"]["improvement"]["point"])
            acc["exact"].append(row["exact_final_layer"].get("improvement") if row["exact_final_layer"] else None)
            acc["acc_delta"].append(100 * (row["accuracy"]["model"] - row["accuracy"]["baseline"]))
    lines = ["| comparison | clamp | final-layer improvement, mean (per seed) | exact final-layer improvement | "
             "overall improvement | accuracy change, points |", "|---|---|---|---|---|---|"]
    for (name, clamp), acc in by_key.items():
        lines.append(f"| {name} | {clamp} | {_fmt(acc['final'])} | {_fmt(acc['exact'])} | {_fmt(acc['overall'])} | "
                     f"{_fmt(acc['acc_delta'])} |")
    table = "\n".join(lines)
    print(table)
    write_json(Path(args.out) / "summary.json", {"seeds": args.seeds, "heads": args.heads, "full": args.full,
                                                 "rows": {f"{k[0]}|{k[1]}": v for k, v in by_key.items()}})
    with atomic_open(Path(args.out) / "summary.md") as handle:
        handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
