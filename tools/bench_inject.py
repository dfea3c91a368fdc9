"""Throughput and agreement of `harden inject` against PyTorchFI 0.6.0 on the same activation campaign.

A small ResNet (stem + three basic blocks, two 1×1 projection shortcuts, linear
classifier; 10 injectable layers; `--model resnet8`, the default) or
torchvision's ResNet-18 (one-channel stem, 21 injectable layers, images padded
to 32 px; `--model resnet18`) is trained briefly on Fashion-MNIST from a
fixed seed. `--model resnet18-224` is the same ResNet-18 at ImageNet's 224 px
(images upscaled 8x by pixel repetition), fine-tuned there from the 32 px
weights, since training it from scratch is beyond a CPU bench. Its BatchNorms
are folded into the convolutions (so that a Conv in
ONNX and a Conv2d hooked by PyTorchFI compute the same tensor), and it is
exported to ONNX. The harden engine then runs a whole-network campaign of
single fp32 bit flips in every Conv/Gemm output. PyTorchFI replays exactly the
same faults (same image, same element, same bit) through its
`declare_neuron_fi(function=...)` custom-hook API, one fault per batch element,
as goldeneye drives it. Both run on the same CPU, single process.

The CPU may be shared, so both engines use the same number of threads
(`--threads`: torch.set_num_threads and ORT's intra-op threads), each runs one
untimed warm-up, then the engines alternate (ABBA order) for --repeats rounds
and both the median and the best (least interfered) round are reported.
Reported: injections/s of both and their ratio (harden timed end to end,
including graph analysis, golden run, profiling and the fsynced JSONL; PyTorchFI
timed over its injection runs only, and again with the fault-free pass that
picks its images and golden classes), each engine's per-layer SDC rate with a
Wilson interval, whether the intervals overlap, and the per-fault agreement.
Each round's ratio pairs two runs made back to back, so the rounds' geometric
mean ratio, with a t interval, is what says whether a speed goal is met. The
same rounds are also paired like for like (PyTorchFI's golden pass added to
its injection runs) and per injection (harden's injection phase against
PyTorchFI's injection runs: the ratio a much longer campaign approaches).

    .venv/bin/python tools/bench_inject.py [--model resnet8|resnet18|resnet18-224] [--threads 1] [--repeats 3]
        [--injections 500] [--eval 256] [--variants cone,suffix:disable] [--allocator default|kept]
        [--work /tmp/harden-bench-inject]

`--variants` lists the harden engines timed (each against the same PyTorchFI
rounds): `cone` (the default engine) and `suffix:LEVEL`; the first one's
faults are the ones PyTorchFI replays.

`--allocator kept` runs the whole bench (both engines: they share the
process) with harden.allocator's glibc settings, which the `harden` command
applies to its own process; the default keeps glibc's defaults, as every
run on record until the twenty-second session did.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def build_net():  # type: ignore[no-untyped-def]
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
            self.bnp = nn.BatchNorm2d(cout) if self.proj is not None else None

        def forward(self, x):  # type: ignore[no-untyped-def]
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            skip = self.bnp(self.proj(x)) if self.proj is not None else x
            return F.relu(out + skip)

    class ResNet8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):  # type: ignore[no-untyped-def]
            x = self.blocks(F.relu(self.bn(self.stem(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet8()


def build_resnet18():  # type: ignore[no-untyped-def]
    """torchvision's ResNet-18 (weights=None: the seeded default init), one input channel, 10 classes."""
    import torch.nn as nn
    import torchvision

    net = torchvision.models.resnet18(weights=None, num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return net


def fold_resnet18(net) -> None:  # type: ignore[no-untyped-def]
    """fold_batchnorm for torchvision's ResNet: stem, each block's two convs and its downsample."""
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    net.conv1, net.bn1 = fuse_conv_bn_eval(net.conv1, net.bn1), nn.Identity()
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
            if block.downsample is not None:
                block.downsample = nn.Sequential(fuse_conv_bn_eval(block.downsample[0], block.downsample[1]))


# name → (builder, BN folder, image side the net sees: Fashion-MNIST's 28 px are zero-padded or upscaled to it)
MODELS = {"resnet8": (build_net, None, 28), "resnet18": (build_resnet18, fold_resnet18, 32),
          "resnet18-224": (build_resnet18, fold_resnet18, 224)}
# nets fine-tuned from another one's weights (same architecture) instead of trained from scratch
FINETUNED_FROM = {"resnet18-224": "resnet18"}


def model_images(images: np.ndarray, side: int) -> np.ndarray:
    """Fashion-MNIST images zero-padded to `side` px, or upscaled by pixel repetition when `side` is a multiple
    of 28 (ImageNet's 224 px); both exact and model-independent."""
    if side > images.shape[-1] and side % images.shape[-1] == 0:
        k = side // images.shape[-1]
        return np.ascontiguousarray(images.repeat(k, axis=-2).repeat(k, axis=-1))
    pad = (side - images.shape[-1]) // 2
    if pad <= 0:
        return images
    return np.ascontiguousarray(np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad))))


def trained_model(work: str, model: str, images: int):  # type: ignore[no-untyped-def]
    """The graph analysis of a model this bench trained into `work`, and `images` Fashion-MNIST test images
    prepared for it: what the tools that study its campaigns start from."""
    import onnx

    from harden.data import load_dataset
    from harden.fi.graphinfo import GraphInfo

    path = Path(work) / f"{model}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run tools/bench_inject.py --model {model} first")
    data = load_dataset("fashion-mnist:test", limit=images, seed=0)
    x = model_images(data.images, MODELS[model][2])
    return GraphInfo(onnx.load(str(path)), example=x[:1]), x


def fold_batchnorm(net) -> None:  # type: ignore[no-untyped-def]
    """Replace every conv → BN pair by one conv with a bias (eval mode), BN by identity."""
    import torch.nn as nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net.eval()
    net.stem, net.bn = fuse_conv_bn_eval(net.stem, net.bn), nn.Identity()
    for block in net.blocks:
        block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
        if block.proj is not None:
            block.proj, block.bnp = fuse_conv_bn_eval(block.proj, block.bnp), nn.Identity()


def train_and_export(work: Path, images: int, epochs: int, name: str = "resnet8") -> tuple[Path, object]:
    """Train (or reuse) the net from seed 0 and export it; return the ONNX path and the folded torch net."""
    import torch

    from harden.data import load_dataset

    build, fold, side = MODELS[name]
    onnx_path, state_path = work / f"{name}.onnx", work / f"{name}.pt"
    torch.manual_seed(0)
    net = build()
    lr, batch = 0.1, 128
    if name in FINETUNED_FROM and not state_path.exists():
        # training at 224 px from scratch is beyond a CPU bench: start from the small-image net, adapt briefly
        base = FINETUNED_FROM[name]
        train_and_export(work, 12000, 2, base)
        net.load_state_dict(torch.load(work / f"{base}.pt"))
        torch.manual_seed(0)
        lr, batch = 0.01, 32
    if state_path.exists():
        net.load_state_dict(torch.load(state_path))
    else:
        data = load_dataset("fashion-mnist:train", limit=images, seed=0)
        x, y = torch.from_numpy(model_images(data.images, side)), torch.from_numpy(data.labels)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch):
                idx = order[start:start + batch]
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            print(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
        torch.save(net.state_dict(), state_path)
    (fold or fold_batchnorm)(net)
    if not onnx_path.exists():
        torch.onnx.export(net, (torch.zeros(1, 1, side, side),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx_path, net


def module_name(node: str) -> str:
    """The torch module path of an exported node: '/layer2/layer2.0/downsample/downsample.0/Conv' → 'layer2.0.downsample.0'."""
    full: list[str] = []
    for part in node.strip("/").split("/")[:-1]:
        head, dot, last = part.rpartition(".")
        if dot and full and full[-1] == head:
            full.append(last)
        elif not dot or not full:
            full.extend(part.split("."))
        else:
            full.append(part)
    return ".".join(full)


def pfi_layer_order(net, shape: list[int], layer_types: tuple) -> list[str]:  # type: ignore[no-untyped-def]
    """Module names of the injectable layers in PyTorchFI's numbering (the order they run in)."""
    import torch

    names = {m: n for n, m in net.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
               for m in names if isinstance(m, layer_types)]
    with torch.no_grad():
        net(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return order


def pytorchfi_golden(net, x: np.ndarray, labels: np.ndarray, batch: int,  # type: ignore[no-untyped-def]
                     threads: int) -> tuple[float, np.ndarray]:
    """The fault-free pass a PyTorchFI user runs first; (seconds, ids of the images the paper's filter keeps).

    PyTorchFI leaves the protocol to its user: the golden class of every image
    (an SDC is a change from it) and the filter (correct, softmax Top2Diff > 0)
    take one plain forward over the evaluation set, as harden's evaluation pass
    does. Timing it too makes the two campaigns the same work end to end.
    """
    import torch

    torch.set_num_threads(threads)
    xt = torch.from_numpy(x)
    started = time.perf_counter()
    with torch.no_grad():
        scores = torch.cat([net(xt[i:i + batch]) for i in range(0, len(xt), batch)])
    p = torch.softmax(scores.double(), dim=1)
    top = p.topk(2, dim=1).values
    keep = (scores.argmax(dim=1).numpy() == labels) & ((top[:, 0] - top[:, 1]).numpy() > 0)
    return time.perf_counter() - started, np.flatnonzero(keep)


def pytorchfi_replay(net, x: np.ndarray, sites: list[dict], records: list[dict], batch: int,  # type: ignore[no-untyped-def]
                     threads: int, limit: int | None = None) -> tuple[float, dict]:
    """Replay the harden campaign's faults through PyTorchFI; (seconds, {site: [sdc flags]}).

    Each ONNX site is matched to its PyTorchFI layer by module name (not by
    position: a block's downsample conv has the same shape as its second conv).
    `limit` replays only that many faults per site (the warm-up).
    """
    import torch
    import torch.nn as nn
    from pytorchfi.core import fault_injection

    class BitFlipFI(fault_injection):
        """PyTorchFI with an IEEE-754 bit-flip neuron hook (the library ships none)."""

        bits: list[int] = []

        def flip_hook(self, module, inputs, output):  # type: ignore[no-untyped-def]
            layer = self.get_current_layer()
            sel = [i for i, l in enumerate(self.corrupt_layer) if l == layer]
            if sel:
                index = [torch.tensor([self.corrupt_batch[i] for i in sel]), torch.tensor([self.corrupt_dim1[i] for i in sel])]
                if output.dim() == 4:
                    index += [torch.tensor([self.corrupt_dim2[i] for i in sel]), torch.tensor([self.corrupt_dim3[i] for i in sel])]
                masks = (np.uint32(1) << np.asarray([self.bits[i] for i in sel], dtype=np.uint32)).view(np.int32)
                values = output[tuple(index)].contiguous()
                output[tuple(index)] = (values.view(torch.int32) ^ torch.from_numpy(masks)).view(torch.float32)
            self.updateLayer()
            if self.get_current_layer() >= self.get_total_layers():
                self.reset_current_layer()

    torch.set_num_threads(threads)
    shape = list(x.shape[1:])
    pfi = BitFlipFI(net, batch, input_shape=shape, layer_types=[nn.Conv2d, nn.Linear])
    order = pfi_layer_order(net, shape, (nn.Conv2d, nn.Linear))
    if len(order) != len(sites):
        raise RuntimeError(f"PyTorchFI sees {len(order)} layers, the ONNX campaign {len(sites)}")
    numbers = []
    for site in sites:
        name = module_name(site["node"])
        if name not in order:
            raise RuntimeError(f"ONNX node {site['node']} maps to module {name!r}, which PyTorchFI does not hook")
        i = order.index(name)
        if list(pfi.get_layer_shape(i)[1:]) != list(site["shape"]):
            raise RuntimeError(f"layer {i}: PyTorchFI shape {pfi.get_layer_shape(i)} vs ONNX {site['shape']}")
        numbers.append(i)
    xt = torch.from_numpy(x)
    flags: dict[str, list[bool]] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for layer, site in zip(numbers, sites):
            recs = [r for r in records if r["site"] == site["name"]][:limit]
            out: list[bool] = []
            for start in range(0, len(recs), batch):
                chunk = recs[start:start + batch]
                loc = np.unravel_index([r["element"] for r in chunk], site["shape"])
                dims = [list(map(int, d)) for d in loc] + [[None] * len(chunk)] * (3 - len(loc))
                pfi.bits = [r["bits"][0] for r in chunk]
                model = pfi.declare_neuron_fi(function=pfi.flip_hook, batch=list(range(len(chunk))),
                                              layer_num=[layer] * len(chunk), dim1=dims[0], dim2=dims[1], dim3=dims[2])
                pfi.reset_current_layer()
                scores = model(xt[[r["image"] for r in chunk]]).numpy()
                masked = np.where(np.isnan(scores), -np.inf, scores)
                cls = np.where(np.isnan(scores).all(axis=1), -1, masked.argmax(axis=1))
                out += [bool(c != r["golden_class"]) for c, r in zip(cls, chunk)]
            flags[site["name"]] = out
    return time.perf_counter() - started, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet8")
    parser.add_argument("--injections", type=int, default=500, help="injections per layer")
    parser.add_argument("--eval", type=int, default=256, help="Fashion-MNIST test images before filtering")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    parser.add_argument("--repeats", type=int, default=3, help="timed alternating rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of both engines (torch.set_num_threads, ORT intra-op threads)")
    parser.add_argument("--variants", default="cone,suffix:disable",
                        help="harden engines to time: cone, or suffix:LEVEL (an ORT optimisation level); "
                             "the first is compared fault by fault")
    parser.add_argument("--allocator", choices=("default", "kept"), default="default",
                        help="glibc's allocator settings for the whole process (harden.allocator)")
    args = parser.parse_args()
    if args.allocator == "kept":
        from harden.allocator import keep_freed_memory

        if not keep_freed_memory():  # before torch and ONNX Runtime start their threads
            raise SystemExit("--allocator kept needs glibc (and HARDEN_ALLOCATOR unset)")

    import torch

    from harden.data import load_dataset
    from harden.fi import CampaignConfig, run_campaign
    from harden.fi.journal import JournalContents

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    onnx_path, net = train_and_export(work, args.train_images, args.epochs, args.model)
    data = load_dataset("fashion-mnist:test", limit=args.eval, seed=0)
    images = model_images(data.images, MODELS[args.model][2])
    from harden.fi.stats import binomial_rate as _warm  # import scipy before timing: it is not campaign work

    _warm(1, 2)
    levels = args.variants.split(",")

    def harden_round(level: str, injections: int) -> tuple[float, object]:
        engine, _, opt = level.partition(":")
        config = CampaignConfig(layers="all", kinds=("activation",), injections=injections,
                                batch=args.batch, seed=0, opt_level=opt or "disable", engine=engine)
        started = time.perf_counter()
        summary = run_campaign(onnx_path, images, data.labels, config, work / f"campaign-{level}.jsonl",
                               progress=False, fresh=True, threads=args.threads)
        return time.perf_counter() - started, summary

    # Warm-up (untimed): lazy imports, allocator and thread pools of both engines.
    for level in levels:
        harden_round(level, args.batch)
    contents = JournalContents(work / f"campaign-{levels[0]}.jsonl")
    pytorchfi_golden(net, images, data.labels, args.batch, args.threads)
    pytorchfi_replay(net, images, contents.header["sites"], list(contents.records()), args.batch, args.threads,
                     limit=args.batch)
    # The CPU is shared: the engines alternate, in ABBA order, and each reports its median and best round.
    runs: dict[str, list[tuple[float, float]]] = {}
    summaries: dict[str, object] = {}
    pfi_times: list[float] = []
    golden_times: list[float] = []
    pfi_kept = np.empty(0, dtype=np.int64)
    flags: dict[str, list[bool]] = {}
    records: list[dict] = []
    sites: list[dict] = []
    for round_ in range(args.repeats):
        def harden_all() -> None:
            for level in levels:
                seconds, summaries[level] = harden_round(level, args.injections)
                runs.setdefault(level, []).append((seconds, float(summaries[level].injections_per_s or 0.0)))

        def pfi() -> None:
            nonlocal flags, records, sites, pfi_kept
            seconds, pfi_kept = pytorchfi_golden(net, images, data.labels, args.batch, args.threads)
            golden_times.append(seconds)
            contents = JournalContents(work / f"campaign-{levels[0]}.jsonl")
            sites, records = contents.header["sites"], list(contents.records())
            # PyTorchFI sees images by position in the same array the engine was given
            seconds, flags = pytorchfi_replay(net, images, sites, records, args.batch, args.threads)
            pfi_times.append(seconds)

        if round_ % 2 == 0:
            harden_all()
            pfi()
        else:
            pfi()
            harden_all()
    same_images = pfi_kept.tolist() == JournalContents(work / f"campaign-{levels[0]}.jsonl").header["eval"]["ids"]
    report(args, net, onnx_path, images, levels, runs, summaries, pfi_times, flags, records, sites, work,
           golden_times, same_images)


def report(args, net, onnx_path: Path, images: np.ndarray, levels: list[str], runs: dict, summaries: dict,  # type: ignore[no-untyped-def]
           pfi_times: list[float], flags: dict, records: list[dict], sites: list[dict], work: Path,
           golden_times: list[float], same_images: bool) -> None:
    """Print throughput (median and best round), plain-forward speeds and the per-layer agreement; write bench.json.

    The headline ratio sets harden's whole campaign against PyTorchFI's injection runs alone, as every earlier
    release measured it; the second adds PyTorchFI's golden pass, which its user must also run."""
    import torch

    from harden.fi.stats import binomial_rate

    level = levels[0]
    summary = summaries[level]
    total = len(records)
    pfi_med, pfi_best = float(np.median(pfi_times)), min(pfi_times)
    print(f"model: {args.model} (BN folded), Fashion-MNIST at {images.shape[-1]} px; accuracy "
          f"{summary.evaluation['correct']}/{summary.evaluation['total']}, {summary.evaluation['kept']} images kept; "
          f"{len(sites)} layers × {args.injections} injections = {total}; fp32 single-bit flips; batch {args.batch}; "
          f"threads {args.threads} (torch {torch.get_num_threads()}, ORT intra-op {args.threads}); "
          f"{args.repeats} timed alternating rounds after a warm-up; "
          f"allocator: {'harden.allocator settings' if args.allocator == 'kept' else 'glibc defaults'}")
    print("all round times: PyTorchFI " + ", ".join(f"{t:.2f}" for t in pfi_times) + " s; "
          + "; ".join(f"harden {k} " + ", ".join(f"{r[0]:.2f}" for r in v) + " s" for k, v in runs.items()))
    print(f"PyTorchFI 0.6.0 (torch {torch.__version__}): median {total / pfi_med:8.1f} inj/s, "
          f"best {total / pfi_best:8.1f} inj/s (injection runs only)")
    gold_med = float(np.median(golden_times))
    print(f"PyTorchFI's golden pass over the {len(images)} evaluation images (the paper's filter): median "
          f"{gold_med:.2f} s; it keeps the same images as harden: {same_images}")
    plain = sorted({v.partition(":")[2] or "all" for v in levels})
    torch_s, ort_s = plain_forward_times(net, onnx_path, images[:args.batch], plain, args.threads)
    print(f"plain forward of {args.batch} images (no faults): torch {1e3 * torch_s:.1f} ms; "
          + ", ".join(f"ORT opt={k} {1e3 * v:.1f} ms ({torch_s / v:.1f}x)" for k, v in ort_s.items()))
    for lvl, rounds in runs.items():
        med, best = float(np.median([r[0] for r in rounds])), min(r[0] for r in rounds)
        phase = float(np.median([r[1] for r in rounds]))
        engine, _, opt = lvl.partition(":")
        how = ("cone engine: windows node by node at opt=all" if engine == "cone" else
               f"suffix engine, opt={opt}: prefix {'extended' if opt == 'all' else opt}, suffixes {opt}")
        print(f"harden (ORT {ort_version()}, {how}): "
              f"median {total / med:8.1f} inj/s end to end ({med:.2f} s; {pfi_med / med:.1f}x PyTorchFI's median), "
              f"best {total / best:8.1f} inj/s ({pfi_best / best:.1f}x PyTorchFI's best); "
              f"injection phase median {phase:8.1f} inj/s; {(pfi_med + gold_med) / med:.1f}x PyTorchFI's median "
              "with its golden pass")
    # The machine's speed drifts over a long bench; a round's two engines ran back to back (ABBA order), so the
    # ratio within each round shows how far the headline median can move from run to run.
    paired = [p / r[0] for p, r in zip(pfi_times, runs[level])]
    centre, low, high = paired_ratio_interval(paired)
    print(f"round by round, PyTorchFI's injection runs over harden's campaign ({level}): "
          + ", ".join(f"{x:.1f}x" for x in paired) + f" (spread {min(paired):.1f}x to {max(paired):.1f}x); "
          f"geometric mean {centre:.2f}x, 95% interval {low:.2f}x to {high:.2f}x")
    # Two more pairings of the same rounds: like for like (each side's fault-free pass counted, as a user of
    # either tool must run one), and per injection (what a campaign many times longer approaches, the fixed
    # costs spread thin). The headline stays the first, as every earlier release measured it.
    with_golden = [(p + g) / r[0] for p, g, r in zip(pfi_times, golden_times, runs[level])]
    per_injection = [r[1] * p / total for p, r in zip(pfi_times, runs[level])]
    intervals = {"with_golden": paired_ratio_interval(with_golden),
                 "injection_phase": paired_ratio_interval(per_injection)}
    for label, key, ratios in (("with PyTorchFI's golden pass added to its rounds", "with_golden", with_golden),
                               ("injection phase against PyTorchFI's injection runs", "injection_phase",
                                per_injection)):
        mid, lo, hi = intervals[key]
        print(f"round by round, {label}: " + ", ".join(f"{x:.1f}x" for x in ratios)
              + f"; geometric mean {mid:.2f}x, 95% interval {lo:.2f}x to {hi:.2f}x")
    same_levels = all([l.sdc.k for l in s.layers] == [l.sdc.k for l in summary.layers] for s in summaries.values())
    print(f"SDC counts identical across harden variants: {same_levels}")
    rows = []
    print(f"harden ({level}) vs PyTorchFI, same faults:")
    print(f"{'layer':46s} {'harden SDC % [95% CI]':>26s} {'PyTorchFI SDC % [95% CI]':>26s}  overlap  same-verdict")
    for layer in summary.layers:
        theirs = flags[layer.site]
        mine = [r["sdc"] for r in records if r["site"] == layer.site]
        rate = binomial_rate(sum(theirs), len(theirs))
        overlap = not (rate.high < layer.sdc.low or layer.sdc.high < rate.low)
        same = np.mean([a == b for a, b in zip(mine, theirs)])
        rows.append({"site": layer.site, "harden": layer.sdc.to_dict(), "pytorchfi": rate.to_dict(),
                     "overlap": overlap, "agreement": float(same)})
        print(f"{layer.site[-46:]:46s} {100 * layer.sdc.value:7.2f} [{100 * layer.sdc.low:5.2f},{100 * layer.sdc.high:6.2f}]"
              f"    {100 * rate.value:7.2f} [{100 * rate.low:5.2f},{100 * rate.high:6.2f}]    {'yes' if overlap else 'NO':>5s}"
              f"  {100 * same:9.2f}%")
    differ = [(r, theirs) for layer in summary.layers
              for r, theirs in zip([r for r in records if r["site"] == layer.site], flags[layer.site])
              if r["sdc"] != theirs]
    for r, theirs in differ:
        print(f"disagreement at {r['site']}: image {r['image']}, element {r['element']}, bits {r['bits']}, "
              f"golden {r['golden']} -> faulty {r['faulty']}; harden SDC {r['sdc']} (class {r['faulty_class']}), "
              f"PyTorchFI SDC {theirs}")
    (work / f"bench-{args.model}.json").write_text(json.dumps(
        {"model": args.model, "threads": args.threads, "allocator": args.allocator, "injections": total,
         "pytorchfi_s": pfi_times,
         "pytorchfi_golden_s": golden_times, "same_images": same_images, "round_ratios": paired,
         "round_ratio_geomean_95": [centre, low, high],
         "round_ratio_with_golden_geomean_95": list(intervals["with_golden"]),
         "round_ratio_injection_phase_geomean_95": list(intervals["injection_phase"]),
         "harden": {k: [{"seconds": r[0], "phase_inj_per_s": r[1]} for r in v] for k, v in runs.items()},
         "layers": rows}, indent=2))


def paired_ratio_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The geometric mean of the rounds' speed ratios and Student's t interval for it (on their logarithms).

    Why: the headline median moves by about 1x between runs of this bench on a
    shared VM, so a goal such as "10x" is only met if the interval's lower end
    clears it; with one round there is no interval and both ends are the ratio.
    """
    from scipy.stats import t

    logs = np.log(np.asarray(ratios, dtype=np.float64))
    centre = float(logs.mean())
    if len(logs) < 2:
        return float(np.exp(centre)), float(np.exp(centre)), float(np.exp(centre))
    half = float(t.ppf((1 + confidence) / 2, len(logs) - 1) * logs.std(ddof=1) / np.sqrt(len(logs)))
    return float(np.exp(centre)), float(np.exp(centre - half)), float(np.exp(centre + half))


def plain_forward_times(net, onnx_path: Path, x: np.ndarray, levels: list[str],  # type: ignore[no-untyped-def]
                        threads: int, repeats: int = 10) -> tuple[float, dict[str, float]]:
    """Median seconds of one fault-free forward in torch and in ORT at each level: the raw-speed ceiling."""
    import torch

    from harden.graph.onnx_io import load_model
    from harden.graph.ort import make_session

    def median(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    xt = torch.from_numpy(x)
    with torch.no_grad():
        torch_s = median(lambda: net(xt))
    model = load_model(onnx_path)
    ort_s = {}
    for level in levels:
        session = make_session(model, opt_level=level, threads=threads, spinning=False)
        ort_s[level] = median(lambda: session.run(None, {"x": x}))
    return torch_s, ort_s


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
