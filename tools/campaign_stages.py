"""Where one `harden inject` campaign spends its time: the wall time and CPU use of each stage.

`tools/bench_inject.py` times a campaign end to end against PyTorchFI, and
`tools/cone_profile.py` times the cone engine's windows site by site. This
tool sits between them: it runs the bench's campaign (same model, images and
config; make the model with bench_inject.py first) and splits its wall time
into reading the model, graph analysis, the evaluation pass (every image node
by node: golden scores, ranges, the first cache block), the injection phase,
and the golden passes of later blocks inside it. For each stage it prints how
many cores were busy (process CPU time over wall time), and for the fault
walks the share of the workers' time spent inside ONNX Runtime's node runs.
It also prints how many faults each walk carried, per cache block, and how
long each worker sat idle at the block's end, waiting for the last walk. It
answers "what is left to speed up outside the kernels?".

    .venv/bin/python tools/campaign_stages.py [--model resnet18-224] [--injections 512] [--eval 128]
        [--batch 32] [--threads 2] [--repeats 2] [--work /tmp/harden-bench-inject]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Stages:
    """Wall seconds and CPU seconds of wrapped functions, summed per stage name."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            before, started = _cpu(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - started
                self.cpu[name] += _cpu() - before
        return timed


# Stages in the order a campaign runs them; the golden passes of later blocks are part of the injection phase.
ORDER = ("read and hash the model", "graph analysis", "evaluation pass", "injection phase",
         "  golden passes of later blocks")


def _cpu() -> float:
    """User and system CPU seconds of the whole process (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def idle_at_end(ends: list[tuple[int, float]]) -> str:
    """How long each worker waited between its own last walk of a block and the block's last walk."""
    if not ends:
        return "-"
    last = max(t for _, t in ends)
    own: dict[int, float] = {}
    for thread, t in ends:
        own[thread] = max(own.get(thread, t), t)
    return ", ".join(f"{last - t:.2f} s" for t in sorted(own.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-224")
    parser.add_argument("--injections", type=int, default=512, help="injections per layer")
    parser.add_argument("--eval", type=int, default=128, help="Fashion-MNIST test images before filtering")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed campaigns after one small warm-up")
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    args = parser.parse_args()

    from bench_inject import MODELS, model_images
    from harden.data import load_dataset
    from harden.fi import CampaignConfig, engine, nodes, run_campaign, runner
    from harden.fi.stats import binomial_rate

    path = Path(args.work) / f"{args.model}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run tools/bench_inject.py --model {args.model} first")
    data = load_dataset("fashion-mnist:test", limit=args.eval, seed=0)
    images = model_images(data.images, MODELS[args.model][2])
    binomial_rate(1, 2)  # import scipy before timing, as the bench does

    stages = Stages()
    engine._model_and_hash = stages.wrap("read and hash the model", engine._model_and_hash)
    engine.GraphInfo = stages.wrap("graph analysis", engine.GraphInfo)
    engine.prepare_eval_nodes = stages.wrap("evaluation pass", engine.prepare_eval_nodes)
    engine._execute = stages.wrap("injection phase", engine._execute)
    engine.golden_pass = stages.wrap("  golden passes of later blocks", engine.golden_pass)
    # ORT time inside node runs, summed over the threads that make them, by the stage running. A block's
    # golden pass runs only once the previous block's walks have all finished, so the stages never overlap.
    in_ort: dict[str, float] = defaultdict(float)
    lock = threading.Lock()
    now = ["other"]
    run = nodes.NodeSessions.run

    def node_run(self: Any, *a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return run(self, *a, **k)
        finally:
            with lock:
                in_ort[now[0]] += time.perf_counter() - started

    def during(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def marked(*a: Any, **k: Any) -> Any:
            before, now[0] = now[0], name
            try:
                return fn(*a, **k)
            finally:
                now[0] = before
        return marked

    # the faults each walk carries, per cache block: small walks pay more per fault for their node calls
    # (tools/core_sharing.py), so this says which regime a campaign's walks are in
    walk_sizes: list[list[int]] = []
    group = engine._walks

    def sized(*a: Any, **k: Any) -> Any:
        groups = group(*a, **k)
        walk_sizes.append([sum(s.count for s in g) for g in groups])
        return groups

    # each walk's thread and end time, per block: a worker whose last walk ends early idles until the block's
    # last walk is done, since the next block's golden pass waits for every walk of this one
    walk_ends: list[list[tuple[int, float]]] = []
    inject_many = runner.SiteRunner.inject_many

    def walk(self: Any, *a: Any, **k: Any) -> Any:
        try:
            return inject_many(self, *a, **k)
        finally:
            with lock:
                walk_ends[-1].append((threading.get_ident(), time.perf_counter()))

    def block_start(*a: Any, **k: Any) -> Any:
        walk_ends.append([])
        return sized(*a, **k)

    engine._walks = block_start
    runner.SiteRunner.inject_many = walk  # type: ignore[method-assign]
    engine._execute = during("walk", engine._execute)
    engine.golden_pass = during("golden", engine.golden_pass)
    nodes.NodeSessions.run = node_run  # type: ignore[method-assign]

    out = Path(args.work) / "campaign-stages.jsonl"
    for round_ in range(args.repeats + 1):
        stages.wall.clear()
        stages.cpu.clear()
        in_ort.clear()
        walk_sizes.clear()
        walk_ends.clear()
        config = CampaignConfig(layers="all", kinds=("activation",), batch=args.batch, seed=0,
                                injections=args.injections if round_ else args.batch, engine="cone")
        started, before = time.perf_counter(), _cpu()
        summary = run_campaign(path, images, data.labels, config, out, progress=False, fresh=True,
                               threads=args.threads)
        total, cpu = time.perf_counter() - started, _cpu() - before
        if not round_:
            continue  # the warm-up: lazy imports, thread pools, first-touch memory
        print(f"campaign {round_}: {total:.2f} s, {cpu / total:.2f} cores busy; "
              f"{summary.injections_per_s:.1f} inj/s in the injection phase")
        for name in ORDER:
            wall = stages.wall[name]
            if wall > 0:
                print(f"  {name:34s} {wall:7.2f} s  {stages.cpu[name] / wall:5.2f} cores busy")
        walking = (stages.wall["injection phase"] - stages.wall["  golden passes of later blocks"]) * args.threads
        if walking > 0:
            print(f"  the fault walks spent {100 * in_ort['walk'] / walking:.0f}% of their workers' time in "
                  f"ONNX Runtime node runs (the rest: crops, pastes, masking checks, waiting)")
        for block, (sizes, ends) in enumerate(zip(walk_sizes, walk_ends)):
            print(f"  block {block}: {len(sizes)} walks of {min(sizes)}-{max(sizes)} faults "
                  f"(median {int(statistics.median(sizes))}); workers idle {idle_at_end(ends)} at its end")


if __name__ == "__main__":
    main()
