"""Independent ONNX Runtime runs side by side, each on one thread, results in order.

ORT's NCHW Conv gives other bits on one image with 2 intra-op threads than
batched or on one thread (a 128→32 3×3 conv on 8×8 maps, ORT 1.32), so a
result computed with intra-op threads could depend on the machine's core
count and on where a batch happened to be cut. The injector and the range
profiler promise the same bytes whatever `--threads`: their sessions run on
one thread, and the threads go to running several independent pieces (image
chunks, fault batches) at once instead. For the cone engine's small windowed
runs this is also the faster way to use the cores.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import onnx

from harden.errors import HardenError

T = TypeVar("T")
R = TypeVar("R")


def concurrent_runs(threads: int) -> int:
    """How many runs go at once for a `threads` setting: that many, or every CPU this process may use for 0."""
    if threads < 0:
        raise HardenError(f"threads must be 0 (every CPU) or a positive count, got {threads}")
    if threads > 0:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item) for each item, in order, computed up to `workers` at once and at most 2 × workers ahead of the
    consumer (so that a long pass over images never holds more than a few chunks' results)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="run") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def run_model(model: onnx.ModelProto, x: np.ndarray, outputs: list[str], opt_level: str, batch: int = 256,
              threads: int = 0, providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",)
              ) -> list[np.ndarray]:
    """The model's `outputs` over `x`, each chunk of `batch` on one ORT thread and `threads` chunks at once
    (0: every CPU): the same bits on any machine, whatever the thread count."""
    from harden.graph.batching import images_per_run
    from harden.graph.ort import make_session, run_batched

    session = make_session(model, providers=providers, opt_level=opt_level, threads=1, spinning=False)
    return run_batched(session, x, outputs=outputs, batch=images_per_run(model, batch),
                       workers=concurrent_runs(threads))
