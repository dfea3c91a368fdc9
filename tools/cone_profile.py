"""Where the cone engine spends its time: per site, the cost per fault, the share of faults that end early
(masked), the time spent in each top-level stage of the network, and the multiply-adds recomputed per fault
as a share of a forward pass, which caps the speed-up of recomputing these windows, whatever the kernels.

It explains the throughput that `tools/bench_inject.py` measures: faults that end early are nearly free, and
what remains is the part of the network after the fault's window has spread over whole maps. Runs on a model
that bench_inject.py has trained and exported into its work folder (run that first), or, with `--untrained
ARCH`, on a torchvision ResNet with its seeded initial weights at 224 px (one-channel stem, BatchNorm statistics
from the images, folded on export): is the cap a property of one bench model, or of ResNets at this size?
(On ResNet-18 the untrained net's share comes out close to the trained one's.)

    .venv/bin/python tools/cone_profile.py [--model resnet18-224 | --untrained resnet50] [--faults 64]
        [--images 16] [--work /tmp/harden-bench-inject] [--by-op]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def stage(name: str) -> str:
    """The top-level module of an exported node name ('/layer4/layer4.0/conv1/Conv' → 'layer4')."""
    parts = name.strip("/").split("/")
    return parts[0] if len(parts) > 1 else name


def multiply_adds(info, index: int, outputs: dict) -> float:  # type: ignore[no-untyped-def,type-arg]
    """Multiply-adds of one run of node `index` that gave `outputs`: Conv and Gemm only (the rest is small)."""
    node = info.nodes[index]
    if node.op_type not in ("Conv", "Gemm") or node.input[1] not in info.constants:
        return 0.0
    weight = info.constants[node.input[1]].shape
    out = next(iter(outputs.values()))
    per_output = int(np.prod(weight[1:])) if node.op_type == "Conv" else int(np.prod(weight)) // out.shape[-1]
    return float(out.size) * per_output


def untrained_model(arch: str, work: str, images: int):  # type: ignore[no-untyped-def]
    """(GraphInfo, images) of torchvision's `arch` with its seeded initial weights, exported at 224 px.

    Its BatchNorms take their statistics from a few training-mode passes over
    the images, so that activations have the scale and ReLU masking a trained
    net's would roughly have; eval-mode export folds them into the convolutions.
    """
    from pathlib import Path

    import onnx
    import torch
    import torchvision

    from bench_inject import model_images
    from harden.data import load_dataset
    from harden.fi.graphinfo import GraphInfo

    data = load_dataset("fashion-mnist:test", limit=max(images, 64), seed=0)
    x = model_images(data.images, 224)
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the passes below
    net.train()
    with torch.no_grad():
        for start in range(0, len(x), 16):
            net(torch.from_numpy(x[start:start + 16]))
    net.eval()
    path = Path(work) / f"untrained-{arch}-224.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(1, 1, 224, 224),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return GraphInfo(onnx.load(str(path)), example=x[:1]), x[:images]


@dataclass
class WalkProfile:
    """What the timed pass of profile_walks measured."""

    sites: dict[str, tuple[float, int]]  # per site: seconds, faults that ended early
    stages: dict[tuple[str, str], float]  # seconds in node runs per (site, stage)
    macs: dict[str, float]  # Conv and Gemm multiply-adds per site
    forward_macs: float  # those of one fault-free forward pass of an image
    ops: dict[tuple[str, str, str], list[float]]  # per (stage, op, 'whole' or 'window'): seconds, mul-adds, calls


def walk_sites(info, sessions, golden, faults: int,  # type: ignore[no-untyped-def]
               on_site: Callable[[str], None] | None = None) -> dict[str, tuple[float, int]]:
    """Walk `faults` single-bit fp32 flips at every activation site of `info` through `sessions`, on the images of
    the golden block `golden`; per site, the seconds taken and the faults that ended early. The faults are drawn
    from one seed, so every call (and every thread of `tools/core_sharing.py`) walks the same ones. `on_site` is
    told each site's tensor before its walk, so that a caller timing node runs can charge them to it."""
    from harden.fi.cone import Cone
    from harden.fi.faults import FaultModel
    from harden.fi.sites import list_sites

    n_images = len(golden[info.scores])
    fault = FaultModel(fmt="fp32")
    rng = np.random.default_rng(0)
    results: dict[str, tuple[float, int]] = {}
    for site in (s for s in list_sites(info) if s.kind == "activation"):
        if on_site is not None:
            on_site(site.tensor)
        cone = Cone(info, sessions, site.tensor)
        rows = rng.integers(0, n_images, faults)
        elems = rng.integers(0, site.elements, faults)
        values = golden[site.tensor].reshape(n_images, -1)[rows, elems]
        bits, uniforms = fault.draw(rng, faults)
        faulty = fault.apply(values, bits, uniforms, 1.0, 1.0)
        started = time.perf_counter()
        _, early = cone.scores(golden, rows, elems, faulty, golden[info.scores][rows])
        results[site.tensor] = (time.perf_counter() - started, early)
    return results


def profile_walks(info, x: np.ndarray, faults: int = 64, threads: int = 1) -> WalkProfile:  # type: ignore[no-untyped-def]
    """walk_sites on the images `x`, twice (the first builds the sessions; the second is timed), with every node
    run timed. `tools/core_sharing.py` runs this in several processes at once."""
    from harden.fi.cone import GoldenBlock
    from harden.fi.nodes import NodeSessions, golden_pass

    sessions = NodeSessions(info, ["CPUExecutionProvider"], threads)
    spent: dict[tuple[str, str], float] = defaultdict(float)
    macs: dict[str, float] = defaultdict(float)  # multiply-adds of Conv and Gemm, by site ('' = golden pass)
    ops: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    run = sessions.run
    current = [""]  # the site whose walk is running ('' = the golden pass)

    def timed(i: int, values: dict, override: tuple = ()) -> dict:  # type: ignore[type-arg]
        started = time.perf_counter()
        out = run(i, values, override)
        seconds = time.perf_counter() - started
        node = info.nodes[i]
        spent[(current[0], stage(node.name))] += seconds
        work = multiply_adds(info, i, out)
        macs[current[0]] += work
        first = next(iter(out.values()))
        full = info.tensors[node.output[0]].shape
        whole = first.ndim != 4 or tuple(first.shape[2:]) == tuple(full[2:])
        entry = ops[(stage(node.name), node.op_type, "whole" if whole else "window")]
        entry[0] += seconds
        entry[1] += work
        entry[2] += 1
        return out

    sessions.run = timed  # type: ignore[method-assign]
    golden = GoldenBlock(golden_pass(sessions, x, len(x)))
    forward_macs = macs.pop("") / len(x)
    def charge_to(tensor: str) -> None:
        current[0] = tensor

    results: dict[str, tuple[float, int]] = {}
    for _ in range(2):  # the first pass builds the sessions; the second is timed
        spent.clear()
        macs.clear()
        ops.clear()
        results = walk_sites(info, sessions, golden, faults, charge_to)
    return WalkProfile(results, dict(spent), dict(macs), forward_macs, dict(ops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-224")
    parser.add_argument("--untrained", metavar="ARCH",
                        help="profile torchvision's ARCH (e.g. resnet50) with its initial weights instead")
    parser.add_argument("--faults", type=int, default=64, help="single-bit fp32 flips per site (one batch)")
    parser.add_argument("--images", type=int, default=16, help="Fashion-MNIST test images the faults use")
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--by-op", action="store_true",
                        help="also the time and multiply-add rate of each op, per stage, on windows and whole maps")
    args = parser.parse_args()

    from bench_inject import trained_model

    info, x = (untrained_model(args.untrained, args.work, args.images) if args.untrained
               else trained_model(args.work, args.model, args.images))
    name = f"untrained {args.untrained}-224" if args.untrained else args.model
    profile = profile_walks(info, x, args.faults, args.threads)
    results, spent, macs, forward_macs, ops = (profile.sites, profile.stages, profile.macs, profile.forward_macs,
                                               profile.ops)
    n_faults = len(results) * args.faults
    total = sum(t for t, _ in results.values())
    print(f"{name}: {len(results)} activation sites × {args.faults} faults, {args.threads} thread(s); "
          f"{1e3 * total / n_faults:.2f} ms per fault on average")
    by_stage: dict[str, float] = defaultdict(float)
    for (_, name), t in spent.items():
        by_stage[name] += t
    print("time in each stage, all sites: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in by_stage.items()
                                                          if v / total >= 0.01))
    share = sum(macs.values()) / n_faults / forward_macs
    print(f"Conv and Gemm multiply-adds recomputed per fault: {100 * share:.1f}% of a forward pass "
          f"({forward_macs / 1e9:.2f} G): at the forward pass's speed, at most {1 / share:.1f}x faster than a "
          "full run per fault")
    print(f"{'site':44s} {'ms/fault':>8s} {'ended early':>12s}  top stages")
    for tensor, (seconds, early) in results.items():
        parts = sorted(((v, k[1]) for k, v in spent.items() if k[0] == tensor), reverse=True)[:2]
        tops = ", ".join(f"{name} {1e3 * v / args.faults:.2f}" for v, name in parts if v > 0)
        print(f"{tensor[-44:]:44s} {1e3 * seconds / args.faults:8.2f} {early:5d}/{args.faults:<5d}  {tops}")
    if args.by_op:
        print_ops(ops, total, n_faults)


def print_ops(ops: dict[tuple[str, str, str], list[float]], total: float, n_faults: int) -> None:
    """Node runs by stage, op and extent, largest first (those over 0.5% of the walks' time): how far the
    kernels are from this CPU's peak. The rate counts every kernel tap, padding included, as the forward
    pass's share above does."""
    outside = total - sum(v[0] for v in ops.values())
    print(f"\n{'stage':8s} {'op':22s} {'extent':7s} {'ms/fault':>8s} {'share':>6s} {'calls':>6s} {'G mul-add/s':>12s}")
    for (name, op, extent), (seconds, work, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
        if seconds / total >= 0.005:
            rate = f"{work / seconds / 1e9:12.1f}" if work else f"{'':12s}"
            print(f"{name:8s} {op:22s} {extent:7s} {1e3 * seconds / n_faults:8.3f} {100 * seconds / total:5.1f}% "
                  f"{int(calls):6d} {rate}")
    print(f"{'outside node runs (crops, pastes, masking checks)':39s} {1e3 * outside / n_faults:8.3f} "
          f"{100 * outside / total:5.1f}%")


if __name__ == "__main__":
    main()
