"""What glibc's allocator settings cost each engine: harden.allocator's settings against glibc's defaults.

Each measurement runs in a fresh child process, as a user's command does, once
with the C library's defaults (HARDEN_ALLOCATOR=default) and once after
harden.allocator.keep_freed_memory(), the two in turn for --repeats rounds,
on the bench's 224 px ResNet-18 (make it with tools/bench_inject.py first):
- `harden`: one `harden inject`-style campaign (run_campaign, the bench's
  config: every activation site, --injections per site, --eval images);
- `torch`: the PyTorch net's plain forward over the same images, batch 32,
  the median of three passes after a warm-up: what PyTorchFI runs per batch;
- `pytorchfi`: PyTorchFI replaying --pfi-faults of the campaign's faults per
  site, as the bench drives it.
For each it prints wall seconds, CPU seconds in the kernel (sys) and the
memory faulted in (minor page faults × 4 KiB), per arm, and the median
speed-up. The bench's ratio moves by the ratio of the two engines' speed-ups.

    .venv/bin/python tools/allocator_effect.py [--repeats 3] [--workloads harden,torch,pytorchfi]
        [--injections 512] [--eval 128] [--pfi-faults 64] [--threads 2] [--work /tmp/harden-bench-inject]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "resnet18-224"
ARMS = ("default", "kept")
WORKLOADS = ("harden", "torch", "pytorchfi")


def _usage() -> tuple[float, int]:
    """Kernel CPU seconds and minor page faults of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    """Wall seconds, sys seconds and GiB faulted in while `fn()` runs."""
    sys0, faults0 = _usage()
    started = time.perf_counter()
    fn()
    wall = time.perf_counter() - started
    sys1, faults1 = _usage()
    return {"wall": wall, "sys": sys1 - sys0, "gib": (faults1 - faults0) * resource.getpagesize() / 2**30}


def child(workload: str, args: argparse.Namespace) -> dict[str, float]:
    """One measurement in this (fresh) process; the arm is chosen by the HARDEN_ALLOCATOR the parent set."""
    from harden.allocator import keep_freed_memory

    keep_freed_memory()  # first, as the `harden` command does; a no-op where HARDEN_ALLOCATOR=default
    import torch
    from bench_inject import MODELS, model_images, pytorchfi_replay, train_and_export

    from harden.data import load_dataset
    from harden.fi import CampaignConfig, run_campaign
    from harden.fi.journal import JournalContents
    from harden.fi.stats import binomial_rate

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if not (work / f"{MODEL}.onnx").exists():
        raise SystemExit(f"{work / MODEL}.onnx is missing: run tools/bench_inject.py --model {MODEL} first")
    onnx_path, net = train_and_export(work, 12000, 2, MODEL)
    data = load_dataset("fashion-mnist:test", limit=args.eval, seed=0)
    images = model_images(data.images, MODELS[MODEL][2])
    binomial_rate(1, 2)  # import scipy before timing, as the bench does
    journal = work / "allocator-effect.jsonl"

    def campaign(injections: int) -> None:
        config = CampaignConfig(layers="all", kinds=("activation",), injections=injections, batch=32, seed=0,
                                engine="cone")
        run_campaign(onnx_path, images, data.labels, config, journal, progress=False, fresh=True,
                     threads=args.threads)

    if workload == "harden":
        return _timed(lambda: campaign(args.injections))  # cold, as a user's first campaign runs
    if workload == "torch":
        x = torch.from_numpy(images)

        def forward() -> None:
            with torch.no_grad():
                for i in range(0, len(x), 32):
                    net(x[i:i + 32])

        forward()
        runs = [_timed(forward) for _ in range(3)]
        return sorted(runs, key=lambda r: r["wall"])[1]  # the median pass
    campaign(args.pfi_faults)  # the faults PyTorchFI replays, from a small campaign on the same images
    contents = JournalContents(journal)
    sites, records = contents.header["sites"], list(contents.records())
    pytorchfi_replay(net, images, sites, records, 32, args.threads, limit=4)  # warm-up, as the bench's
    return _timed(lambda: pytorchfi_replay(net, images, sites, records, 32, args.threads, limit=args.pfi_faults))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both arms, in turn")
    parser.add_argument("--workloads", default="harden,torch,pytorchfi")
    parser.add_argument("--injections", type=int, default=512, help="harden: injections per layer")
    parser.add_argument("--eval", type=int, default=128, help="Fashion-MNIST test images before filtering")
    parser.add_argument("--pfi-faults", type=int, default=64, help="pytorchfi: faults replayed per layer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        sys.exit(f"error: unknown workloads {sorted(unknown)}; use some of {', '.join(WORKLOADS)}")

    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(args.repeats):
        for workload in args.workloads.split(","):
            # alternate which arm goes first, so that a drift in the machine's speed falls on both
            for arm in ARMS if round_ % 2 == 0 else ARMS[::-1]:
                env = {k: v for k, v in os.environ.items() if k != "HARDEN_ALLOCATOR"}
                if arm == "default":
                    env["HARDEN_ALLOCATOR"] = "default"
                done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", workload], env=env,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{workload} ({arm}) failed: {done.stderr.strip()[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((workload, arm), []).append(result)
                print(f"round {round_ + 1} {workload:9s} {arm:7s} {result['wall']:7.2f} s  sys {result['sys']:5.2f} s"
                      f"  faulted in {result['gib']:5.2f} GiB", flush=True)
    print(f"\nmedians of {args.repeats} rounds, each in a fresh process ({args.threads} threads):")
    for workload in args.workloads.split(","):
        med = {arm: {k: statistics.median(r[k] for r in results[(workload, arm)]) for k in ("wall", "sys", "gib")}
               for arm in ARMS}
        ratios = [d["wall"] / k["wall"] for d, k in zip(results[(workload, "default")], results[(workload, "kept")])]
        print(f"  {workload:9s} glibc defaults {med['default']['wall']:7.2f} s (sys {med['default']['sys']:5.2f} s, "
              f"{med['default']['gib']:5.2f} GiB faulted in); kept {med['kept']['wall']:7.2f} s "
              f"(sys {med['kept']['sys']:5.2f} s, {med['kept']['gib']:5.2f} GiB): "
              f"{statistics.median(ratios):.2f}x faster (rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
