"""Peak memory and wall time of `harden inject` on a large model: does the cone engine keep to its cache budget?

The cone engine holds every golden tensor of a block of images, and `--cache-mb` (default 1024) sizes that
block. This exports torchvision's ARCH with its seeded initial weights at 224 px (tools/cone_profile.py's
export: one-channel stem, BatchNorm statistics from the images) and runs one `harden inject` campaign on it
in a child process, activations only, then prints the child's wall time and peak resident memory. On a
ResNet-50 the block is 7 images; before the evaluation pass was cut into chunks of the block's size, it held
a whole `--batch` of 64 images' tensors at once.

With `--range-clip`, it runs `harden rewrite --range-clip` on the same model instead (calibrated on the
`--limit` images, every Conv and Gemm output clipped), whose profiling pass exposes every one of those tensors.

    .venv/bin/python tools/inject_memory.py [--arch resnet50] [--limit 400] [--injections 8] [--threads 2]
        [--engine cone|suffix] [--batch 64] [--range-clip] [--work /tmp/harden-inject-memory]

Run it with PYTHONPATH pointing at another checkout to measure that version of harden on the same model.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--limit", type=int, default=400, help="Fashion-MNIST test images before the filter")
    parser.add_argument("--injections", type=int, default=8, help="injections per activation site")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engine", default="cone", choices=("cone", "suffix"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--range-clip", action="store_true", help="measure `harden rewrite --range-clip` instead")
    parser.add_argument("--work", default="/tmp/harden-inject-memory")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from cone_profile import untrained_model

    work = Path(args.work)
    model = work / f"untrained-{args.arch}-224.onnx"
    if not model.exists():
        untrained_model(args.arch, str(work), 16)
    out = work / "campaign.jsonl"
    command = [sys.executable, "-m", "harden", "inject", str(model), "--data", "fashion-mnist:test", "--limit",
               str(args.limit), "--kinds", "activation", "--injections", str(args.injections), "--threads",
               str(args.threads), "--engine", args.engine, "--batch", str(args.batch), "--no-progress", "--fresh",
               "--out", str(out)]
    if args.range_clip:
        out = work / "range-clipped.onnx"
        command = [sys.executable, "-m", "harden", "rewrite", str(model), "--range-clip", "--data",
                   "fashion-mnist:test", "--limit", str(args.limit), "--preprocess",
                   "channels=1,size=224,mean=0,std=1", "-o", str(out)]
    started = time.perf_counter()
    # run outside any checkout, so that PYTHONPATH (not the working directory) says which harden runs
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), cwd=work)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"harden {command[3]} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    import harden

    what = (f"rewrite --range-clip, {args.limit} calibration images" if args.range_clip else
            f"{args.limit} images, {args.injections} injections per activation site, {args.threads} threads, "
            f"{args.engine} engine, batch {args.batch}")
    print(f"{args.arch} at 224 px, {what} "
          f"(harden from {Path(harden.__file__).parent.parent}): "
          f"{seconds:.1f} s, peak memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
