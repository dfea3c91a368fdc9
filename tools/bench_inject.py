"""Throughput and agreement of `harden inject` against PyTorchFI 0.6.0 on the same activation campaign.

A small ResNet (stem + three basic blocks, two 1×1 projection shortcuts, linear
classifier; 10 injectable layers) is trained briefly on Fashion-MNIST from a
fixed seed, its BatchNorms are folded into the convolutions (so that a Conv in
ONNX and a Conv2d hooked by PyTorchFI compute the same tensor), and it is
exported to ONNX. The harden engine then runs a whole-network campaign of
single fp32 bit flips in every Conv/Gemm output. PyTorchFI replays exactly the
same faults (same image, same element, same bit) through its
`declare_neuron_fi(function=...)` custom-hook API, one fault per batch element,
as goldeneye drives it. Both run on the same CPU, single process.

The CPU may be shared, so the engines alternate for --repeats rounds and
medians are reported. Reported: injections/s of both and their ratio (harden timed end to end,
including graph analysis, golden run, profiling and the fsynced JSONL; PyTorchFI
timed over its injection runs only), each engine's per-layer SDC rate with a
Wilson interval, whether the intervals overlap, and the per-fault agreement.

    .venv/bin/python tools/bench_inject.py [--injections 500] [--eval 256] [--work /tmp/harden-bench-inject]
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


def train_and_export(work: Path, images: int, epochs: int) -> tuple[Path, object]:
    """Train (or reuse) the net from seed 0 and export it; return the ONNX path and the folded torch net."""
    import torch

    from harden.data import load_dataset

    onnx_path, state_path = work / "resnet8.onnx", work / "resnet8.pt"
    torch.manual_seed(0)
    net = build_net()
    if state_path.exists():
        net.load_state_dict(torch.load(state_path))
    else:
        data = load_dataset("fashion-mnist:train", limit=images, seed=0)
        x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), 128):
                idx = order[start:start + 128]
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            print(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}")
        torch.save(net.state_dict(), state_path)
    fold_batchnorm(net)
    if not onnx_path.exists():
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx_path, net


def pytorchfi_replay(net, x: np.ndarray, sites: list[dict], records: list[dict], batch: int) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    """Replay the harden campaign's faults through PyTorchFI; (seconds, {site: [sdc flags]})."""
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

    torch.set_num_threads(2)
    pfi = BitFlipFI(net, batch, input_shape=[1, 28, 28], layer_types=[nn.Conv2d, nn.Linear])
    for i, site in enumerate(sites):
        if list(pfi.get_layer_shape(i)[1:]) != list(site["shape"]):
            raise RuntimeError(f"layer {i}: PyTorchFI shape {pfi.get_layer_shape(i)} vs ONNX {site['shape']}")
    xt = torch.from_numpy(x)
    flags: dict[str, list[bool]] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for layer, site in enumerate(sites):
            recs = [r for r in records if r["site"] == site["name"]]
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
    parser.add_argument("--injections", type=int, default=500, help="injections per layer")
    parser.add_argument("--eval", type=int, default=256, help="Fashion-MNIST test images before filtering")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--levels", default="disable,all",
                        help="ORT optimisation levels to time harden at; the first is compared fault by fault")
    args = parser.parse_args()

    import torch

    from harden.data import load_dataset
    from harden.fi import CampaignConfig, run_campaign
    from harden.fi.journal import JournalContents
    from harden.fi.stats import binomial_rate

    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    onnx_path, net = train_and_export(work, args.train_images, args.epochs)
    data = load_dataset("fashion-mnist:test", limit=args.eval, seed=0)
    from harden.fi.stats import binomial_rate as _warm  # import scipy before timing: it is not campaign work

    _warm(1, 2)
    # The CPU is shared: engines alternate for --repeats rounds and each reports its median time.
    runs: dict[str, list[tuple[float, float]]] = {}
    summaries = {}
    pfi_times: list[float] = []
    levels = args.levels.split(",")
    flags: dict[str, list[bool]] = {}
    for _ in range(args.repeats):
        for level in levels:
            config = CampaignConfig(layers="all", kinds=("activation",), injections=args.injections,
                                    batch=args.batch, seed=0, opt_level=level)
            started = time.perf_counter()
            summaries[level] = run_campaign(onnx_path, data.images, data.labels, config,
                                            work / f"campaign-{level}.jsonl", progress=False, fresh=True)
            runs.setdefault(level, []).append((time.perf_counter() - started,
                                               float(summaries[level].injections_per_s or 0.0)))
        contents = JournalContents(work / f"campaign-{levels[0]}.jsonl")
        sites, records = contents.header["sites"], list(contents.records())
        # PyTorchFI sees images by position in the same array the engine was given
        seconds, flags = pytorchfi_replay(net, data.images, sites, records, args.batch)
        pfi_times.append(seconds)
    timings = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in runs.items()}
    level = levels[0]
    summary = summaries[level]
    total = len(records)
    pfi_s = float(np.median(pfi_times))
    pfi_rate = total / pfi_s

    print(f"model: ResNet-8 (BN folded), Fashion-MNIST; accuracy {summary.evaluation['correct']}/"
          f"{summary.evaluation['total']}, {summary.evaluation['kept']} images kept; {len(sites)} layers × "
          f"{args.injections} injections = {total}; fp32 single-bit flips; batch {args.batch}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"medians of {args.repeats} alternating rounds; all times: PyTorchFI "
          + ", ".join(f"{t:.1f}" for t in pfi_times) + " s; "
          + "; ".join(f"harden {k} " + ", ".join(f"{r[0]:.1f}" for r in v) + " s" for k, v in runs.items()))
    best = {k: min(r[0] for r in v) for k, v in runs.items()}
    print("best of rounds (least interference): PyTorchFI "
          f"{total / min(pfi_times):.1f} inj/s; "
          + "; ".join(f"harden {k} {total / b:.1f} inj/s ({min(pfi_times) / b:.1f}x)" for k, b in best.items()))
    print(f"PyTorchFI 0.6.0 (torch {torch.__version__}): {pfi_rate:8.1f} inj/s ({pfi_s:.1f} s)")
    torch_s, ort_s = plain_forward_times(net, onnx_path, data.images[:args.batch], list(timings))
    print(f"plain forward of {args.batch} images (no faults): torch {1e3 * torch_s:.1f} ms; "
          + ", ".join(f"ORT opt={k} {1e3 * v:.1f} ms ({torch_s / v:.1f}x)" for k, v in ort_s.items()))
    for lvl, (secs, phase) in timings.items():
        print(f"harden (ORT {ort_version()}, opt={lvl}): {total / secs:8.1f} inj/s end to end ({secs:.1f} s; "
              f"{total / secs / pfi_rate:.1f}x PyTorchFI), {phase:8.1f} inj/s injection phase "
              f"({phase / pfi_rate:.1f}x)")
    agree = [summaries[lvl] for lvl in timings]
    same_levels = all([l.sdc.k for l in s.layers] == [l.sdc.k for l in summary.layers] for s in agree)
    print(f"SDC counts identical across opt levels: {same_levels}")
    rows = []
    print(f"harden (opt={level}) vs PyTorchFI, same faults:")
    print(f"{'layer':28s} {'harden SDC % [95% CI]':>26s} {'PyTorchFI SDC % [95% CI]':>26s}  overlap  same-verdict")
    for layer in summary.layers:
        theirs = flags[layer.site]
        mine = [r["sdc"] for r in records if r["site"] == layer.site]
        rate = binomial_rate(sum(theirs), len(theirs))
        overlap = not (rate.high < layer.sdc.low or layer.sdc.high < rate.low)
        same = np.mean([a == b for a, b in zip(mine, theirs)])
        rows.append({"site": layer.site, "harden": layer.sdc.to_dict(), "pytorchfi": rate.to_dict(),
                     "overlap": overlap, "agreement": float(same)})
        print(f"{layer.site[:28]:28s} {100 * layer.sdc.value:7.2f} [{100 * layer.sdc.low:5.2f},{100 * layer.sdc.high:6.2f}]"
              f"    {100 * rate.value:7.2f} [{100 * rate.low:5.2f},{100 * rate.high:6.2f}]    {'yes' if overlap else 'NO':>5s}"
              f"  {100 * same:9.2f}%")
    (work / "bench.json").write_text(json.dumps({"injections": total, "pytorchfi_s": pfi_times,
                                                 "harden": {k: [{"seconds": r[0], "phase_inj_per_s": r[1]} for r in v]
                                                            for k, v in runs.items()},
                                                 "layers": rows}, indent=2))


def plain_forward_times(net, onnx_path: Path, x: np.ndarray, levels: list[str],  # type: ignore[no-untyped-def]
                        repeats: int = 10) -> tuple[float, dict[str, float]]:
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
        session = make_session(model, opt_level=level)
        ort_s[level] = median(lambda: session.run(None, {"x": x}))
    return torch_s, ort_s


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
