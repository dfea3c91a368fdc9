"""Would batching pay for a graph whose rows are coupled? ONNX Runtime's cost per image, three ways.

A dynamically quantised graph runs one image per call (harden.graph.batching): its
DynamicQuantizeLinear takes one scale over the whole batch. This script times, at one
thread, the same images through the whole graph
- one image per call (what harden runs),
- `copies` images per call, each in its own copy of the graph (harden.graph.batching.RowRunner,
  which the exact analysis uses to rerun its classifier), checked bit for bit against the first,
- all images in one batched call, which computes something else (the images share their scales) but
  shows what the kernels cost per image when they are batched.

If the batched call is not much cheaper per image than one image per call, the arithmetic, not the
number of calls, bounds a campaign on this graph, and emulating per-row quantisation inside a batch
would gain little.

    .venv/bin/python tools/coupled_batching.py MODEL.onnx [--images 64] [--copies 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from harden.graph.batching import RowRunner, row_coupling
    from harden.graph.onnx_io import load_model
    from harden.graph.ort import make_session

    model = load_model(args.model)
    session = make_session(model, opt_level="disable", threads=1, spinning=False)
    name = session.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(0).standard_normal((args.images, *shape)).astype(np.float32)
    runner = RowRunner(model, copies=args.copies)

    def per_image(run) -> float:  # type: ignore[no-untyped-def]
        run()
        started = time.perf_counter()
        for _ in range(args.repeats):
            run()
        return 1e3 * (time.perf_counter() - started) / (args.repeats * args.images)

    alone = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(args.images)])
    (copied,) = runner.run({name: x})
    one = per_image(lambda: [session.run(None, {name: x[i:i + 1]}) for i in range(args.images)])
    many = per_image(lambda: runner.run({name: x}))
    fixed = session.get_inputs()[0].shape[0]
    print(f"{args.model}: rows coupled by {row_coupling(model) or 'nothing'}; {args.images} images, 1 thread")
    print(f"one image per call:               {one:.3f} ms per image")
    print(f"{args.copies} copies per call (RowRunner):    {many:.3f} ms per image ({one / many:.2f}x), "
          f"same bits as alone: {copied.tobytes() == alone.tobytes()}")
    if isinstance(fixed, int):
        print(f"one batched call: not possible, the graph's batch is fixed at {fixed}")
        return
    batched = per_image(lambda: session.run(None, {name: x}))
    print(f"one batched call (shared scales): {batched:.3f} ms per image ({one / batched:.2f}x)")


if __name__ == "__main__":
    main()
