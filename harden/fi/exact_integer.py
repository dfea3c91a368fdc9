"""The exact final-layer analysis of an integer classifier: a QOperator graph's QGemm or QLinearMatMul head.

harden.fi.integer_head finds the classifier and reproduces its arithmetic;
harden.fi.integer_judges decides each fault from the outputs it makes.

A quantised deployment's classifier is an integer layer: its int32 accumulator
is exact integer arithmetic, acc[n, c] = Σ_f (x[n, f] − zx)·(W[c, f] − zw[c]) + b[c]
(wrapping at 32 bits, as the kernel adds), and its output is requantised once,
y = saturate(round_half_even(float32(acc) · M[c]) + zy) with M = sx·sw/sy in
float32. A single flipped bit changes acc by an exact integer: (x − zx)·Δw in
one class for a weight, Δb for a bias, Δx·(W[:, f] − zw) across the classes for
an input, and the output y itself for an output fault. Where ONNX Runtime's
kernel on this CPU sums uint8 × int8 products in saturating int16 pairs (AVX2
without VNNI), acc is that sum instead, and each move also carries the change
of its pair's saturation (harden.fi.integer_kernel). So every fault × image is
decided by integer arithmetic and one requantisation, with no rounding bound to
allow for. The requantisation is checked against ONNX Runtime's own output on
every analysed image before anything is counted; where it differs in a single
value the analysis is refused rather than approximated.

Between y and the scores there may be elementwise integer ops with constant
operands (the text head's QLinearMul by exp(s)) and the final
DequantizeLinear. y has only 2^8 values, so that tail is a table per class,
which ONNX Runtime itself computes once: scores = table[y, c]. Shape-only ops
may follow. A softmax in the tail (QLinearSoftmax, as the zoo's int8 graphs
end, or Softmax after the DequantizeLinear) mixes the classes: then ONNX
Runtime runs the tail on every row a single-class fault can make, image ×
class × stored value, once, and on every row an input fault makes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from harden.fi.exact import ExactResult, ExactSiteResult
from harden.fi.integer_head import SHAPE_ONLY, IntegerHead, accumulator_type, flip_all, wrap32
from harden.fi.integer_judges import CHUNK, Judge, golden_state
from harden.fi.integer_projection import Projection, analyse_projection


def analyse_head(head: IntegerHead, projection: Projection | None, inputs: np.ndarray, batch: int = 64,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 origin: str = "") -> ExactResult:
    """Exact SDC counts of every single-bit fault in an integer classifier's weight, bias, input and output
    (and its `projection`'s, harden.fi.integer_projection), over the model-ready `inputs`, each flipped in
    the integer type it is stored in. harden.fi.qdq_deployed finds the classifier in the graph ONNX Runtime
    fuses from QDQ; `origin` says so in the reported kind of head."""
    started = time.perf_counter()
    g = golden_state(head, inputs, batch, providers, threads)
    sites = [_weight(head, g.x, g.acc, g.judge), *([_bias(head, g.acc, g.judge)] if head.bias_name else []),
             _input(head, g.x, g.acc, g.y, g.judge), _output(head, g.y, g.judge)]
    ops = [head.op, *([head.pool.op_type] if head.pool is not None else []),
           *(n.op_type for n in head.tail if n.op_type not in SHAPE_ONLY | {"DequantizeLinear"})]
    if projection is not None:
        sites = [*analyse_projection(projection, inputs, g, batch, providers, threads), *sites]
        ops.insert(0, f"{projection.op} projection")
    kind = f"integer linear ({' + '.join(ops)}{', ' + origin if origin else ''})"
    return ExactResult(head=kind, policy="none", fmt=f"stored integers{head.kernel.note}", images=len(inputs),
                       sites=sites, seconds=time.perf_counter() - started)


def _weight(head: IntegerHead, x: np.ndarray, acc: np.ndarray, judge: Judge, bisect: bool = True) -> ExactSiteResult:
    """W[c, f] flipped: class c's accumulator moves by (x[n, f, p] − zx)·Δw at every pixel p of every image.

    With one pixel, where no such move can wrap the int32 accumulator and the judge is monotone, each
    image and class has an interval of moves that keep its top-1 (`_keep_interval`), and a fault costs a
    multiplication and two comparisons; otherwise every faulty accumulator is requantised (and pooled).
    """
    n, features, pixels = x.shape
    site = ExactSiteResult.for_stored(head.weight_name, "weight", head.node, head.stored_weight, n)
    stored, kernel = head.weight_fc, head.kernel  # F × C
    largest = int(np.abs(x.astype(np.int64)).max(initial=0)) + abs(head.zx) if kernel.saturates else \
        int(np.abs(x.astype(np.int64) - head.zx).max(initial=0))
    reach = largest * 2 ** (8 * stored.dtype.itemsize - 1)
    dtype = accumulator_type(acc, reach)
    xz = x.astype(dtype) - dtype(head.zx)  # N × F × P
    pairs = x.transpose(0, 2, 1)  # N × P × F, for a saturating kernel's pairs
    interval = None
    if bisect and pixels == 1 and head.pool is None and dtype == np.int32 and judge.monotone:
        interval = _keep_interval(head, acc[:, :, 0], judge)
        interval = tuple(np.clip(v, -(2**31), 2**31 - 1).astype(np.int32) for v in interval)
    step = max(1, CHUNK // max(1, n * features * pixels))
    for bit in range(len(site.faults)):
        dw = (flip_all(stored, bit) - stored.astype(np.int64)).astype(xz.dtype)  # F × C
        for c0 in range(0, head.classes, step):
            cs = np.arange(c0, min(head.classes, c0 + step))
            move = xz[:, :, None, :] * dw[None, :, cs, None]  # N × F × c × P
            if kernel.saturates:  # each fault's pair sum moves by x·Δw, and its saturation with it
                before = kernel.pair_sums(pairs, stored[:, cs], np.arange(features)).transpose(0, 2, 3, 1)
                move = (move + kernel.move_excess(before, x[:, :, None, :] * dw[None, :, cs, None])).astype(dtype)
            if interval is not None:
                move = move[..., 0]  # N × F × c
                sdc = (move < interval[0][:, None, cs]) | (move > interval[1][:, None, cs])
            else:
                faulty = acc[:, None, cs, :].astype(dtype) + move  # N × F × c × P
                value = head.reduce(faulty if dtype == np.int32 else wrap32(faulty), cs)
                rows = np.broadcast_to(np.arange(n)[:, None, None], value.shape).reshape(-1)
                sdc = judge.sdc(rows, np.broadcast_to(cs, value.shape).reshape(-1),
                                value.reshape(-1)).reshape(value.shape)
            hit = np.flatnonzero((judge.top1 >= cs[0]) & (judge.top1 <= cs[-1]))  # images whose top-1 is here
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(np.count_nonzero(sdc))
            site.hit_faults[bit] += len(hit) * features  # type: ignore[index]
            site.hit_sdc[bit] += int(np.count_nonzero(sdc[hit, :, judge.top1[hit] - cs[0]]))  # type: ignore[index]
    return site


def _keep_interval(head: IntegerHead, acc: np.ndarray, judge: Judge) -> tuple[np.ndarray, np.ndarray]:
    """For each image and class, the moves [lo, hi] of that class's accumulator (N × C, one pixel) that keep
    the image's top-1.

    The requantisation is non-decreasing and the judge monotone, so the top-1 class keeps first place above
    some accumulator and another class stays behind below one; both are found by bisection over the int32
    range, with the exact requantisation at every step.
    """
    n, classes = acc.shape
    own = np.arange(classes)[None, :] == judge.top1[:, None]
    rows, columns = np.indices(acc.shape).reshape(2, -1)

    def keeps(a: np.ndarray) -> np.ndarray:
        return ~judge.sdc(rows, columns, head.reduce(a[:, :, None]).reshape(-1)).reshape(acc.shape)

    # the top-1 class: the smallest accumulator that keeps it (the golden one does)
    low, high = np.full_like(acc, -(2**31)), acc.copy()
    while (low < high).any():
        mid = (low + high) // 2
        ok = keeps(mid)
        low, high = np.where(ok | (low >= high), low, mid + 1), np.where(ok & (low < high), mid, high)
    first = low
    # every other class: the largest accumulator that keeps it behind
    low, high = acc.copy(), np.full_like(acc, 2**31 - 1)
    while (low < high).any():
        mid = (low + high + 1) // 2
        ok = keeps(mid)
        low, high = np.where(ok & (low < high), mid, low), np.where(ok | (low >= high), high, mid - 1)
    last = low
    big = np.int64(2**62)
    return np.where(own, first - acc, -big), np.where(own, big, last - acc)


def _bias(head: IntegerHead, acc: np.ndarray, judge: Judge) -> ExactSiteResult:
    """b[c] flipped: class c's accumulator moves by Δb at every pixel (wrapping at 32 bits, as the kernel's
    addition does)."""
    n = len(acc)
    site = ExactSiteResult.for_stored(head.bias_name, "bias", head.node, head.bias, n)
    classes = np.broadcast_to(np.arange(head.classes)[None, :], acc.shape[:2]).reshape(-1)
    rows = np.broadcast_to(np.arange(n)[:, None], acc.shape[:2]).reshape(-1)
    hit = classes == judge.top1[rows]
    for bit in range(len(site.faults)):
        db = flip_all(head.bias, bit) - head.bias.astype(np.int64)
        sdc = judge.sdc(rows, classes, head.reduce(wrap32(acc + db[None, :, None])).reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _input(head: IntegerHead, x: np.ndarray, acc: np.ndarray, y: np.ndarray, judge: Judge) -> ExactSiteResult:
    """x[n, f, p] flipped: every class's accumulator at pixel p moves by Δx·(W[c, f] − zw), so every class's
    stored output there is recomputed, and its pooled value from the pixels' new sum."""
    n, features, pixels = x.shape
    site = ExactSiteResult.for_stored(head.input, "input", head.node, x[0], n, hits=False)
    sums = y.sum(axis=-1)  # N × C
    moves = [(flip_all(x, bit) - x.astype(np.int64)).reshape(n, -1) for bit in range(len(site.faults))]
    kernel, stored = head.kernel, head.weight_fc
    weights = np.abs(stored.astype(np.int64)) + np.abs(stored.astype(np.int64) - head.wz) if kernel.saturates \
        else np.abs(head.wz)  # a saturating move is at most Δx·(|w| + |zw|)
    reach = max(int(np.abs(dx).max(initial=0)) for dx in moves) * int(weights.max(initial=0))
    dtype = accumulator_type(acc, reach)
    step = max(1, CHUNK // max(1, n * head.classes))
    for k0 in range(0, features * pixels, step):
        ks = np.arange(k0, min(features * pixels, k0 + step))  # feature-major, as x[n] is stored
        f, p = ks // pixels, ks % pixels
        before = acc[:, :, p].transpose(0, 2, 1).astype(dtype)  # N × k × C
        others = sums[:, None, :] - y[:, :, p].transpose(0, 2, 1)  # each class's sum over the other pixels
        wz = head.wz[f, :].astype(dtype)[None]
        if kernel.saturates:  # the pair sums each fault moves: N × k × C
            mate, _ = kernel.partner(f, features)
            sums_before = kernel.pair_values(x[:, f, p], x[:, mate, p], f, stored)
        for bit, dx in enumerate(moves):
            faulty = before + dx[:, ks, None].astype(dtype) * wz
            if kernel.saturates:
                change = dx[:, ks, None] * stored[f].astype(np.int64)[None]
                faulty = (faulty + kernel.move_excess(sums_before, change)).astype(dtype)
            new = head.requantise((faulty if dtype == np.int32 else wrap32(faulty))[..., None])[..., 0]
            sdc = judge.winners(head.pool_sums(others + new, pixels)) != judge.top1[:, None]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
    return site


def _output(head: IntegerHead, y: np.ndarray, judge: Judge) -> ExactSiteResult:
    """y[n, c, p] flipped: that one stored output changes, and with it class c's pooled value."""
    n, classes, pixels = y.shape
    stored = y.astype(head.out_dtype)
    site = ExactSiteResult.for_stored(head.output, "output", head.node, stored[0], n)
    sums = y.sum(axis=-1)
    rows = np.broadcast_to(np.arange(n)[:, None, None], y.shape).reshape(-1)
    cls = np.broadcast_to(np.arange(classes)[None, :, None], y.shape).reshape(-1)
    hit = cls == judge.top1[rows]
    for bit in range(len(site.faults)):
        moved = sums[:, :, None] - y + flip_all(stored, bit)
        sdc = judge.sdc(rows, cls, head.pool_sums(moved, pixels).reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site
