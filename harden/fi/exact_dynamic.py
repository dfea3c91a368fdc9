"""The exact final-layer analysis of a dynamically quantised classifier (quantize_dynamic's MatMulInteger, or a
1×1 ConvInteger on a pooled 1×1 map).

The classifier reads float features f[n] (C of them), which a DynamicQuantizeLinear
quantises at run time from that image's own range: xq = saturate(round(f / sx) + zx).
Its MatMulInteger accumulates in int32,
acc[n, k] = Σ_c (xq[n, c] − zx[n])·(W[c, k] − zw[k]) (with each pair of products
saturated to int16 where ONNX Runtime's kernel on this CPU does so,
harden.fi.integer_kernel), and a Cast, a Mul by
m[n, k] = fl(sx[n]·sw[k]) and the bias Add make the scores,
s[n, k] = fl(fl(float32(acc[n, k])·m[n, k]) + b[k]). Each step after the accumulator is
one float32 operation, monotone in the accumulator, which numpy performs bit for bit
as ONNX Runtime does; that is checked on every analysed image before anything is
counted, and the analysis is refused where a single score differs.

- A weight W[c, k] (int8, as stored) moves acc[n, k] by δ·(xq[n, c] − zx[n]), an exact
  integer. Class k's score is monotone in its accumulator, so each image and class has
  an accumulator bound past which the top-1 changes (found by bisection over int32):
  every weight fault is then one integer comparison.
- A bias b[k] or an output s[n, k] (float32) sets one class's score to a value numpy
  computes exactly. Elementwise ops with constants may follow the layer (the text head's
  Mul by exp(s)): each is one float32 operation too, and a Mul's constant must be
  positive, so that the scores stay monotone in the accumulators.
- An input f[n, c] (float32): while the flipped value leaves the row's range
  [min(0, min f), max(0, max f)] as it was, sx and zx stay and only xq[n, c] changes,
  to what ONNX Runtime's QuantizeLinear makes of it with the row's own scale; every
  class's accumulator then moves by Δq·(W[c, :] − zw). Otherwise the whole row
  requantises, and ONNX Runtime runs the classifier on that row alone (a batch would
  share one scale, harden.graph.batching).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from harden.errors import HardenError
from harden.fi.dynamic_head import ROWWISE, DynamicHead
from harden.fi.dynamic_judges import LARGE, Golden, Post, bounds, clear, one_class_outcome, one_class_sdc
from harden.fi.exact import ExactResult, ExactSiteResult
from harden.fi.exact_site import SOFTMAX_TIE, flip_bit
from harden.fi.graphinfo import GraphInfo
from harden.fi.integer_head import flip_all
from harden.fi.outcome import fault_outcome, nonfinite_rows, top1_class
from harden.fi.suffix import extract
from harden.graph.batching import RowRunner
from harden.graph.ort import expose, make_session

# The most multiply-adds the input site's whole-row reruns may cost before the analysis is refused (as the integer
# projection's rows, harden.fi.integer_projection.ROW_BUDGET: about a minute of ONNX Runtime's int8 kernels here).
RERUN_BUDGET = 2e11
# Rows of scores evaluated at once.
CHUNK = 1 << 21
# Input faults rerun through ONNX Runtime at once (each row still as if alone), to bound their memory.
RERUN_ROWS = 1 << 14
# Multiply-adds of the classifier per ORT call in those reruns: a small head runs many copies of itself per
# call, since a call costs more than its arithmetic (the demo's 128 × 10 head: certify 84 s -> 47 s); a large
# one gains nothing from copies and runs alone (AlexNet's 4096 × 1000 head: its input site took 8.2 s with one
# copy per call, 8.7 s with 64).
RERUN_CALL_MACS = 1 << 18


def analyse_dynamic_head(head: DynamicHead, inputs: np.ndarray,
                         providers: Sequence[str] = ("CPUExecutionProvider",)) -> ExactResult:
    """Exact SDC counts of every single-bit fault in the classifier's stored weight, its bias, input and output,
    over the model-ready `inputs`."""
    started = time.perf_counter()
    g = golden_run(head, inputs, providers)
    post = Post(head, g, providers)
    sites = [_weight(head, g, post), *([_bias(head, g, post)] if head.bias is not None else []),
             _input(head, g, post, inputs, providers), _output(head, g, post)]
    kind = " + ".join(["DynamicQuantizeLinear", head.op, *(n.op_type for n in head.post if n.op_type in ROWWISE)])
    return ExactResult(head=f"dynamic integer linear ({kind})", policy="none",
                       fmt=f"stored ({head.weight.dtype} weight, float32 values){head.kernel.note}",
                       images=len(g.acc), sites=sites, seconds=time.perf_counter() - started, rounding_ties=g.ties)


def golden_run(head: DynamicHead, inputs: np.ndarray, providers: Sequence[str]) -> Golden:
    """ONNX Runtime's fault-free run, one image at a time, and numpy's arithmetic checked against it bit for bit
    (refused where a single value differs); public so that tools can compare the kernel's sums with others."""
    names = [head.scores, head.features, head.quantised, head.scale, head.zero, head.multiplier, head.accumulator,
             head.output, head.post[-1].output[0] if head.post else head.scores]
    session = make_session(expose(head.model, names), providers=providers, opt_level="disable", threads=1,
                           spinning=False)
    feed = head.model.graph.input[0].name
    runs = [session.run(names, {feed: inputs[i:i + 1]}) for i in range(len(inputs))]  # one image per run
    s, f, xq, sx, zx, m, acc, y, final = ([np.asarray(r[j]) for r in runs] for j in range(len(names)))
    n, k = len(inputs), head.classes
    if any(v.size != head.weight.shape[0] for v in f) or any(v.size != k for v in [*s, *acc]):
        raise HardenError("exact analysis: the dynamically quantised classifier's features or scores do not "
                          "have one row per image")
    g = Golden(np.stack(f).reshape(n, -1).astype(np.float32), np.stack(xq).reshape(n, -1).astype(np.int64),
                np.array([int(z) for z in zx]), np.array([float(v) for v in sx], np.float32),
                np.stack([np.broadcast_to(v.reshape(-1), (k,)) for v in m]).astype(np.float32),
                np.stack(acc).reshape(n, k).astype(np.int64), np.stack(y).reshape(n, k).astype(np.float32),
                np.stack(s).reshape(n, k).astype(np.float32), np.zeros(0, np.int64))
    g.feature_shape, g.score_shape = tuple(f[0].shape), tuple(s[0].shape)
    if nonfinite_rows(g.scores).any():
        raise HardenError("exact analysis: the fault-free scores hold NaN or Inf for some images")
    if head.weight.shape[0] * 255 * 255 * 2 >= 2**31:
        raise HardenError("exact analysis: the classifier's int32 accumulator could wrap under a fault")
    mine = (g.xq - g.zx[:, None]) @ head.centred() + head.kernel.correction(g.xq[:, :, None], head.weight)[..., 0]
    if not np.array_equal(mine, g.acc) or not np.array_equal(
            head.layer_output(g.acc, g.m).view(np.uint32), g.output.view(np.uint32)) or not np.array_equal(
            head.after(g.output).view(np.uint32), g.scores.view(np.uint32)):
        raise HardenError("exact analysis: numpy does not reproduce ONNX Runtime's dynamically quantised "
                          "classifier bit for bit on these images")
    g.top1 = top1_class(np.stack(final).reshape(n, -1))
    if head.post:  # an image whose top two scores are within the Softmax's tie band is left out
        top2 = np.sort(g.scores, axis=1)[:, -2:]
        tied = (top2[:, 1] - top2[:, 0] <= SOFTMAX_TIE) | (top1_class(g.scores) != g.top1) | \
            (np.abs(g.scores) >= LARGE).any(axis=1)
        if tied.all():
            raise HardenError("exact analysis: on every image the top two scores are within the Softmax's tie "
                              "band; nothing can be judged exactly")
        g.ties = int(tied.sum())
        g.keep(np.flatnonzero(~tied))
    return g


def _weight(head: DynamicHead, g: Golden, post: Post) -> ExactSiteResult:
    """W[c, k] flipped: class k's accumulator moves by δ·(xq[n, c] − zx[n]); a comparison with its bound, or
    with a Softmax after the scores two bounds, between which ONNX Runtime decides."""
    n = len(g.acc)
    site = ExactSiteResult.for_stored(head.weight_name, "weight", head.node, head.weight, n)
    top = np.arange(head.classes)[None, :] == g.top1[:, None]  # N × K
    if post.session is None:
        sdc_edge = keep_edge = bounds(head, g, lambda r, k, v: one_class_sdc(g, r, k, v))
    else:
        sdc_edge = bounds(head, g, lambda r, k, v: clear(g, r, k, v)[0])
        keep_edge = bounds(head, g, lambda r, k, v: ~clear(g, r, k, v)[1])
    x, kernel = g.xq - g.zx[:, None], head.kernel  # N × C
    # every bit's flipped weights (bits × C × K), stored as the graph stores them
    flipped = [flip_all(head.weight, bit).astype(head.weight.dtype) for bit in range(len(site.faults))]
    for c in range(head.weight.shape[0]):
        # the pair sums through feature c, the same for every bit
        pairs = kernel.pair_sums(g.xq, head.weight, np.array([c]))[:, 0] if kernel.saturates else None  # N × K
        for bit in range(len(site.faults)):
            delta = flipped[bit][c].astype(np.int64) - head.weight[c]  # K
            moved = g.acc + x[:, c:c + 1] * delta[None, :]
            if pairs is not None:  # the pair sum moves by xq·δ, and its saturation with it
                moved += kernel.move_excess(pairs, g.xq[:, c:c + 1] * delta[None, :])
            sdc = np.where(top, moved < sdc_edge, moved > sdc_edge)
            unclear = ~sdc & np.where(top, moved < keep_edge, moved > keep_edge)
            if unclear.any():
                r, k = np.nonzero(unclear)
                acc = g.acc[r].copy()
                acc[np.arange(len(r)), k] = moved[r, k]
                values = head.logits(acc, g.m[r])[np.arange(len(r)), k]
                sdc[r, k], due = one_class_outcome(g, post, r, k, values)
                site.due[bit] += int(due.sum())
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
            site.hit_faults[bit] += int(top.sum())  # type: ignore[index]
            site.hit_sdc[bit] += int((sdc & top).sum())  # type: ignore[index]
    return site


def _one_class_site(g: Golden, post: Post, site: ExactSiteResult, faulty: list[np.ndarray]) -> ExactSiteResult:
    """Count faults that each set one class's score: faulty[bit] is N × K, the new score of that class."""
    n, k = g.scores.shape
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k)).reshape(-1)
    ks = np.broadcast_to(np.arange(k)[None, :], (n, k)).reshape(-1)
    hit = ks == g.top1[rows]
    for bit, values in enumerate(faulty):
        sdc, due = one_class_outcome(g, post, rows, ks, values.reshape(-1))
        site.faults[bit] += int(sdc.size)
        site.sdc[bit] += int(sdc.sum())
        site.due[bit] += int(due.sum())
        site.hit_faults[bit] += int(hit.sum())  # type: ignore[index]
        site.hit_sdc[bit] += int((sdc & hit).sum())  # type: ignore[index]
    return site


def _bias(head: DynamicHead, g: Golden, post: Post) -> ExactSiteResult:
    """b[k] flipped: class k's layer output is fl(y[n, k] + b'[k]) with y the rescaled accumulator, then the
    tail's ops."""
    assert head.bias is not None
    site = ExactSiteResult.for_stored(head.bias_name, "bias", head.node, head.bias, len(g.acc))
    faulty = [head.after(head.layer_output(g.acc, g.m, flip_bit(head.bias, bit, "fp32"))) for bit in range(32)]
    return _one_class_site(g, post, site, faulty)


def _output(head: DynamicHead, g: Golden, post: Post) -> ExactSiteResult:
    """The layer's output y[n, k] flipped: that score alone, through the tail's ops."""
    site = ExactSiteResult.for_stored(head.output, "output", head.node, g.output[0], len(g.acc))
    return _one_class_site(g, post, site, [head.after(flip_bit(g.output, bit, "fp32")) for bit in range(32)])


def _input(head: DynamicHead, g: Golden, post: Post, inputs: np.ndarray,
           providers: Sequence[str]) -> ExactSiteResult:
    """f[n, c] flipped: the row's quantisation kept (one quantised value moves every class's accumulator), or
    the row requantised whole and rerun through ONNX Runtime."""
    n, c = g.f.shape
    site = ExactSiteResult.for_stored(head.features, "input", head.node, g.f[0], n, hits=False)
    faulty = np.stack([flip_bit(g.f, bit, "fp32") for bit in range(32)])  # 32 × N × C
    kept = _range_kept(g.f, faulty)
    reruns = int((~kept).sum())
    if reruns * c * head.classes > RERUN_BUDGET:
        most = max(1, int(n * RERUN_BUDGET / (reruns * c * head.classes)))
        raise HardenError(f"exact analysis: {reruns:,} input faults of the dynamically quantised classifier change "
                          f"their row's quantisation and must each rerun it; this allows at most {most} images "
                          "(certify with a smaller --limit)")
    faults, sdc, due = np.zeros(32, np.int64), np.zeros(32, np.int64), np.zeros(32, np.int64)
    quantise = _quantiser(providers)
    centred = head.centred()
    step = max(1, CHUNK // head.classes)
    for i in range(n):
        if not np.array_equal(quantise(g.f[i], g.sx[i], g.zx[i]), g.xq[i]):
            raise HardenError("exact analysis: ONNX Runtime's QuantizeLinear does not reproduce the classifier's "
                              "dynamic quantisation of its features")
        bits, cols = np.nonzero(kept[:, i, :])
        np.add.at(faults, bits, 1)
        dq = quantise(faulty[bits, i, cols], g.sx[i], g.zx[i]) - g.xq[i, cols]
        moved = np.flatnonzero(dq != 0)  # an unchanged quantised value leaves every score as it was
        for start in range(0, len(moved), step):
            sel = moved[start:start + step]
            acc = g.acc[i][None, :] + dq[sel, None] * centred[cols[sel]]
            if head.kernel.saturates:  # the pair sums each fault moves, and their saturation
                change = dq[sel, None] * head.weight[cols[sel]].astype(np.int64)
                acc += head.kernel.move_excess(head.kernel.pair_sums(g.xq[i], head.weight, cols[sel]), change)
            hit, bad = post.outcome(head.logits(acc, g.m[i][None, :]), np.full(len(sel), g.top1[i]))
            np.add.at(sdc, bits[sel], hit)
            np.add.at(due, bits[sel], bad)
    if reruns:
        tail = _tail_runner(head, inputs, providers)
        bits, rows, cols = np.nonzero(~kept)
        for start in range(0, reruns, RERUN_ROWS):
            b, r, col = bits[start:start + RERUN_ROWS], rows[start:start + RERUN_ROWS], cols[start:start + RERUN_ROWS]
            x = g.f[r]  # fancy indexing copies
            x[np.arange(len(x)), col] = faulty[b, r, col]
            (out,) = tail.run({head.features: x.reshape(len(x), *g.feature_shape[1:])})
            hit, bad = fault_outcome(out.reshape(len(x), -1), g.top1[r])
            np.add.at(faults, b, 1)
            np.add.at(sdc, b, hit)
            np.add.at(due, b, bad)
    site.faults, site.sdc, site.due = faults.tolist(), sdc.tolist(), due.tolist()
    site.recomputed = reruns
    return site


def _range_kept(f: np.ndarray, faulty: np.ndarray) -> np.ndarray:
    """Whether each flipped value (bits × N × C) leaves its row's range [min(0, min f), max(0, max f)], and so
    the DynamicQuantizeLinear's scale and zero point, as they were. NaN never does."""
    lo, hi = np.minimum(f.min(axis=1), 0), np.maximum(f.max(axis=1), 0)
    order = np.sort(f, axis=1)
    top, bottom = f == order[:, -1:], f == order[:, :1]
    # each element's row range without it: the second best where it alone holds the best
    hi_without = np.where(top & (top.sum(axis=1, keepdims=True) == 1), order[:, -2:-1], order[:, -1:])
    lo_without = np.where(bottom & (bottom.sum(axis=1, keepdims=True) == 1), order[:, 1:2], order[:, :1])
    with np.errstate(invalid="ignore"):
        new_hi = np.maximum(np.maximum(hi_without, np.float32(0))[None], faulty)
        new_lo = np.minimum(np.minimum(lo_without, np.float32(0))[None], faulty)
        return (new_hi == hi[None, :, None]) & (new_lo == lo[None, :, None])


def _quantiser(providers: Sequence[str]):  # type: ignore[no-untyped-def]
    """ONNX Runtime's QuantizeLinear (to uint8, as DynamicQuantizeLinear writes) with a given scale and zero
    point: what the DynamicQuantizeLinear makes of a value once its row's scale is known."""
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["R"]),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                                            helper.make_tensor_value_info("z", TensorProto.UINT8, [])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, ["R"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = make_session(model, providers=providers, opt_level="disable", threads=1, spinning=False)

    def quantise(x: np.ndarray, scale: np.floating, zero: int) -> np.ndarray:
        feeds = {"x": np.asarray(x, np.float32).reshape(-1), "s": np.asarray(scale, np.float32),
                 "z": np.asarray(zero, np.uint8)}
        return session.run(None, feeds)[0].astype(np.int64)

    return quantise


def _tail_runner(head: DynamicHead, inputs: np.ndarray, providers: Sequence[str]) -> RowRunner:
    """The classifier from its float features to the scores, each row run as if alone, many per call (its rows
    are coupled, harden.graph.batching)."""
    info = GraphInfo(head.model, example=inputs[:1], providers=providers)
    final = head.post[-1].output[0] if head.post else head.scores
    copies = int(np.clip(RERUN_CALL_MACS // head.weight.size, 1, 64))
    return RowRunner(extract(info, [head.features], [final]), copies=copies, providers=providers)
