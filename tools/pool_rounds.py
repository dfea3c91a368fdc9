"""The speed ratio of `harden inject` over PyTorchFI, pooled over every bench run whose round times are on record.

One run of `tools/bench_inject.py` gives three to five paired rounds, and on
a shared VM its interval is wide (PyTorchFI's own rate moves by up to 15%
between runs). Pooling the rounds of every recorded run of the same command
(`tools/data/bench_inject_rounds.json`, with the commit and source of each)
gives the tightest interval the record allows. For each pairing the bench
prints, it prints each run's geometric mean and the pooled one with its 95%
t interval:

- headline: PyTorchFI's injection runs over harden's whole campaign;
- like for like: PyTorchFI's golden pass added to its injection runs;
- per injection: harden's injection phase against PyTorchFI's injection runs.

Runs made with `--allocator kept` (glibc told to keep freed memory, for both
engines) are pooled apart from those on glibc's defaults: the allocator
moves the two engines by different amounts (tools/allocator_effect.py).

The last two need per-round golden-pass and phase figures, recorded since the
nineteenth session. The record holds runs of one command only: the runs at
`harden inject`'s default of 1000 injections per layer (`--injections 1000`)
are in `tools/data/bench_inject_rounds_1000.json`, pooled with `--record`.
`--add` pools a new run's bench JSON too (before it is copied into the record).

    .venv/bin/python tools/pool_rounds.py [--record tools/data/bench_inject_rounds.json]
        [--add /tmp/harden-bench-inject/bench-resnet18-224.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_inject import paired_ratio_interval  # noqa: E402

RECORD = Path(__file__).resolve().parent / "data" / "bench_inject_rounds.json"
ALLOCATORS = {"default": "glibc defaults", "kept": "allocator kept"}


def from_bench_json(path: Path, label: str) -> dict[str, Any]:
    """A record entry from the JSON that tools/bench_inject.py writes (its first harden variant)."""
    data = json.loads(path.read_text())
    rounds = next(iter(data["harden"].values()))
    return {"run": label, "commit": "?", "allocator": data.get("allocator", "default"),
            "pytorchfi_s": data["pytorchfi_s"],
            "pytorchfi_golden_s": data.get("pytorchfi_golden_s"), "harden_s": [r["seconds"] for r in rounds],
            "harden_phase_inj_per_s": [r["phase_inj_per_s"] for r in rounds], "injections": data["injections"]}


def pairings(run: dict[str, Any], injections: int) -> dict[str, list[float]]:
    """The run's round ratios for each pairing it has the figures for."""
    pfi, harden = run["pytorchfi_s"], run["harden_s"]
    out = {"headline": [p / h for p, h in zip(pfi, harden)]}
    if run.get("pytorchfi_golden_s"):
        out["like for like"] = [(p + g) / h for p, g, h in zip(pfi, run["pytorchfi_golden_s"], harden)]
    if run.get("harden_phase_inj_per_s"):
        n = run.get("injections", injections)
        out["per injection"] = [rate * p / n for rate, p in zip(run["harden_phase_inj_per_s"], pfi)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, default=RECORD)
    parser.add_argument("--add", type=Path, action="append", default=[], help="a bench JSON to pool as well")
    args = parser.parse_args()

    try:
        record = json.loads(args.record.read_text())
        runs = list(record["runs"]) + [from_bench_json(p, f"added {i + 1}") for i, p in enumerate(args.add)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: cannot read the rounds: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(record["what"])
    pooled: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        allocator = ALLOCATORS.get(run.get("allocator", "default"), str(run.get("allocator")))  # a label
        ratios = pairings(run, record["injections"])
        parts = []
        for name, values in ratios.items():
            pooled.setdefault((allocator, name), []).extend(values)
            parts.append(f"{name} {paired_ratio_interval(values)[0]:.2f}x")
        rounds = ", ".join(f"{r:.1f}x" for r in ratios["headline"])
        print(f"run {run['run']} ({run['commit']}, {allocator}): rounds {rounds}; " + "; ".join(parts))
    for (allocator, name), values in pooled.items():
        centre, low, high = paired_ratio_interval(values)
        print(f"pooled, {allocator}, {name}: {len(values)} rounds, geometric mean {centre:.2f}x, "
              f"95% interval {low:.2f}x to {high:.2f}x")


if __name__ == "__main__":
    main()
