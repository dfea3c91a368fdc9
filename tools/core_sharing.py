"""How much one fault walk slows another down when two run at once, and why: clock, memory or the process.

`harden inject --threads 2` runs two cone walks at once, one per core. On the
bench's 224 px ResNet-18 the injection phase then runs about 1.8x as fast as
with one, not 2x. This tool asks whether the engine's threading or the machine
costs the difference. It runs `tools/cone_profile.py`'s timed walks (the same
faults, sites and images) in child processes four ways:

- alone;
- beside a process that keeps the other core busy with a small matrix product
  held in its L1 cache: if the walk slows down, the cores share their clock
  (turbo or power limits);
- beside a second copy of the same walks: if it slows down more, the cores
  share their memory system (L3 cache, memory bandwidth);
- as two threads of one process, the way `harden inject` runs them: the same
  walks once alone, then twice at once on one golden block, one set of node
  sessions and one Python interpreter. Its throughput against its own lone
  walk, next to the two processes', is what running the walks in one process
  costs.

Separate processes share no Python lock and no ONNX Runtime thread pool, so
what slows them is the hardware alone. On a shared cloud VM one process's
speed moves by 10% between runs, so the four ways run in turn, `--repeats`
times, and the tool prints each way's median. Make the model with
`tools/bench_inject.py --model resnet18-224` first.

    .venv/bin/python tools/core_sharing.py [--model resnet18-224] [--faults 64] [--images 16]
        [--repeats 3] [--work /tmp/harden-bench-inject]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the children import the bench's model loader and harden from the checkout
sys.path[:0] = [str(HERE), str(HERE.parent)]
# the walks run one ORT thread; so must the neighbours, or they would take both cores
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def walk_once(model: str, faults: int, images: int, work: str) -> dict[str, float]:
    """(In the child.) The timed walks' cost per fault, in all and in whole-map layer4 convolutions."""
    from bench_inject import trained_model
    from cone_profile import profile_walks

    info, x = trained_model(work, model, images)
    profile = profile_walks(info, x, faults)
    n = len(profile.sites) * faults
    seconds, work_done, _ = profile.ops.get(("layer4", "Conv", "whole"), [0.0, 0.0, 0.0])
    return {"ms_per_fault": 1e3 * sum(t for t, _ in profile.sites.values()) / n,
            "layer4_ms_per_fault": 1e3 * seconds / n,
            "layer4_rate": work_done / seconds / 1e9 if seconds else float("nan")}


def walk_threads(model: str, faults: int, images: int, work: str) -> dict[str, float]:
    """(In the child.) The walks' cost per fault alone, then run by two threads at once (wall time over both
    threads' faults), in one process with one golden block and one set of node sessions, as an inject campaign
    runs them; no node run is timed, so neither figure carries profile_walks' instrumentation."""
    import threading

    from bench_inject import trained_model
    from cone_profile import walk_sites

    from harden.fi.cone import GoldenBlock
    from harden.fi.nodes import NodeSessions, golden_pass

    info, x = trained_model(work, model, images)
    sessions = NodeSessions(info, ["CPUExecutionProvider"], 1)
    golden = GoldenBlock(golden_pass(sessions, x, len(x)))
    n = len(walk_sites(info, sessions, golden, faults)) * faults  # builds the sessions
    started = time.perf_counter()
    walk_sites(info, sessions, golden, faults)
    alone = time.perf_counter() - started
    walkers = [threading.Thread(target=walk_sites, args=(info, sessions, golden, faults)) for _ in range(2)]
    started = time.perf_counter()
    for w in walkers:
        w.start()
    for w in walkers:
        w.join()
    both = time.perf_counter() - started
    return {"alone_ms_per_fault": 1e3 * alone / n, "threads_ms_per_fault": 1e3 * both / (2 * n)}


def spin() -> None:
    """(In the child.) Multiply two 64×64 float32 matrices until killed: fused multiply-adds from L1 only."""
    import numpy as np

    a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    while True:
        for _ in range(1000):
            a @ a


def _child(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, **ONE_THREAD}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, env=env)


def _flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--faults", str(args.faults), "--images", str(args.images), "--work", args.work]


def _walks(args: argparse.Namespace, copies: int, spinner: bool) -> list[dict[str, float]]:
    """Run `copies` walk processes at once (beside a spinner if asked) and return what each measured."""
    flags = _flags(args)
    neighbour = _child("--spin") if spinner else None
    try:
        if neighbour is not None:
            time.sleep(1.0)  # let it reach full speed before the walks start
        walkers = [_child("--walk", *flags) for _ in range(copies)]
        outputs = [w.communicate()[0] for w in walkers]
        if any(w.returncode for w in walkers):
            raise SystemExit("a walk process failed (is the model made? run tools/bench_inject.py first)")
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def _threads(args: argparse.Namespace) -> dict[str, float]:
    """Run the walks alone and then as two threads, in one child process (walk_threads)."""
    child = _child("--threads-walk", *_flags(args))
    output = child.communicate()[0]
    if child.returncode:
        raise SystemExit("the threads' walk process failed (is the model made? run tools/bench_inject.py first)")
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-224")
    parser.add_argument("--faults", type=int, default=64, help="single-bit fp32 flips per site")
    parser.add_argument("--images", type=int, default=16, help="Fashion-MNIST test images the faults use")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way, in turn")
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    parser.add_argument("--walk", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads-walk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin:
        spin()
        return
    if args.walk:
        print(json.dumps(walk_once(args.model, args.faults, args.images, args.work)))
        return
    if args.threads_walk:
        print(json.dumps(walk_threads(args.model, args.faults, args.images, args.work)))
        return
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("this tool compares two cores; this machine has one")

    ways = {"alone": (1, False), "beside an L1-bound spinner": (1, True), "beside a second walk": (2, False)}
    measured: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    threaded: list[dict[str, float]] = []
    for _ in range(args.repeats):  # in turn, so that a slow spell of the machine hits every way alike
        for way, (copies, spinner) in ways.items():
            measured[way].extend(_walks(args, copies, spinner))
        threaded.append(_threads(args))

    def median(way: str, key: str) -> float:
        return statistics.median(m[key] for m in measured[way])

    alone = median("alone", "ms_per_fault")
    print(f"{args.model}: cone walks, {args.faults} faults per site, one ORT thread per process; "
          f"medians of {args.repeats} runs in turn")
    print(f"{'':28s} {'ms/fault':>9s} {'slower':>7s} {'layer4 whole-map convs':>24s}   every run (ms/fault)")
    for way in ways:
        cost = median(way, "ms_per_fault")
        runs = ", ".join(f"{m['ms_per_fault']:.2f}" for m in measured[way])
        print(f"{way:28s} {cost:9.2f} {100 * (cost / alone - 1):6.1f}% {median(way, 'layer4_ms_per_fault'):9.2f} ms, "
              f"{median(way, 'layer4_rate'):5.1f} G mul-add/s   {runs}")
    pair = median("beside a second walk", "ms_per_fault")
    print(f"two walks at once: {2 * alone / pair:.2f}x the throughput of one (2.00x if the cores shared nothing)")
    ratios = [t["alone_ms_per_fault"] / t["threads_ms_per_fault"] for t in threaded]
    runs = ", ".join(f"{t['alone_ms_per_fault']:.2f} → {t['threads_ms_per_fault']:.2f}" for t in threaded)
    print(f"two walks as threads of one process: {statistics.median(ratios):.2f}x the throughput of its own lone "
          f"walk (median; every run, ms per fault alone → per fault of two threads' throughput: {runs})")

if __name__ == "__main__":
    main()
