"""The integer layer before an integer classifier (the text head's projection z = P·f + b), decided exactly.

In the text head the classifier reads ẑ = z/‖z‖ requantised, and z is the
stored output of an integer projection (QGemm or QLinearMatMul) that is
dequantised and normalised in float. A flip in P[e, j], in b[e] or in the stored
z[n, e] changes exactly one stored value of z, and everything after z (the
dequantisation, the norm, the requantisation, the classifier and its tail) is a
function of the row of E stored values alone, which ONNX Runtime computes. So
each such fault's outcome is the top-1 of one row: z[n] with z[n, e] set to the
faulty value, which the projection's exact integer arithmetic gives
(harden.fi.integer_head). Many faults share a row: each distinct (image, e,
value) runs through ORT once, as the graph's own nodes run it. A flip in f[n, j]
moves every component of z[n], so its row runs on its own.

Any integer layer whose output reaches the classifier through nodes that read
nothing else is such a projection (the text head's, or an MLP head's first
layer); one reached through a residual sum or a convolution is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError
from harden.fi.exact import ExactSiteResult
from harden.fi.integer_head import (
    LAYERS, IntegerHead, constant_producers, accumulator_type, flip_all, wrap32,
)
from harden.fi.integer_judges import CHUNK, golden_state
from harden.graph.ort import make_session

# the layers a projection may be; a convolution's pixels would each need a row
PROJECTIONS = frozenset({"QGemm", "QLinearMatMul"})
# the rows a projection's table may hold (image × component × stored value): 1,365 images of a 384-d text head
TABLE_CELLS = 1 << 27
# multiply-adds of the classifier the rows may take in all: a few minutes of ONNX Runtime (the demo's text
# head on 458 images: 2.5e10)
ROW_BUDGET = 2 * 10**11
# ops that end the walk back from the classifier without a projection: another layer, or a join of branches
BARRIERS = frozenset({"QLinearConv", "Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
                      "Add", "QLinearConcat", "Concat"})


class Projection:
    """The projection layer's arithmetic (an IntegerHead of the graph cut at its output), and ONNX Runtime
    running everything from its stored output to the scores."""

    def __init__(self, model: onnx.ModelProto, output: str, dtype: np.dtype, rest: list[onnx.NodeProto],
                 classes: int) -> None:
        cut = onnx.ModelProto()
        cut.CopyFrom(model)
        del cut.graph.output[:]
        cut.graph.output.append(helper.make_tensor_value_info(output, helper.np_dtype_to_tensor_dtype(dtype), None))
        self.layer = IntegerHead(cut)
        self.output, self.dtype, self.rest, self.classes = output, dtype, rest, classes
        constants = {t.name: t for t in model.graph.initializer}
        inits = {t: constants[t] for n in rest for t in n.input if t in constants}
        graph = helper.make_graph(rest, "rest", [helper.make_tensor_value_info(
            output, helper.np_dtype_to_tensor_dtype(dtype), [None, self.layer.classes])], [model.graph.output[0]],
            list(inits.values()))
        part = helper.make_model(graph, opset_imports=list(model.opset_import))
        part.ir_version = model.ir_version
        self._rest = make_session(part, opt_level="disable")

    def top1(self, rows: np.ndarray) -> np.ndarray:
        """The top-1 class of each row of stored projection outputs (… × E)."""
        flat = rows.reshape(-1, rows.shape[-1]).astype(self.dtype)
        out = [np.argmax(np.asarray(self._rest.run(None, {self.output: flat[i:i + 4096]})[0])
                         .reshape(len(flat[i:i + 4096]), -1), axis=1) for i in range(0, len(flat), 4096)]
        return np.concatenate(out).reshape(rows.shape[:-1]) if out else np.zeros(rows.shape[:-1], np.int64)


def find_projection(head: IntegerHead) -> Projection | None:
    """The integer layer whose output alone the classifier reads (through nodes that read nothing else), or
    None. A projection whose weight, bias or quantisation parameters are not constants is not analysed."""
    constant, _ = constant_producers(head.model)
    producer = {o: n for n in head.model.graph.node for o in n.output if o}
    middle: dict[str, onnx.NodeProto] = {}
    sources: set[str] = set()
    pending = [head.input]
    while pending:
        tensor = pending.pop()
        node = producer.get(tensor)
        if node is None or node.op_type in BARRIERS or len(middle) > 64:
            return None
        if node.op_type in PROJECTIONS:
            sources.add(tensor)
        elif node.name not in middle:
            middle[node.name] = node
            pending.extend(t for t in node.input if t and t not in constant)
    if len(sources) != 1:
        return None
    (output,) = sources
    layer = producer[output]
    zero_point = layer.input[LAYERS[layer.op_type][3][5]] if len(layer.input) > LAYERS[layer.op_type][3][5] else ""
    stored = {t.name: t for t in head.model.graph.initializer}
    dtype = onnx.numpy_helper.to_array(stored[zero_point]).dtype if zero_point in stored else np.dtype(np.uint8)
    position = {id(n): i for i, n in enumerate(head.model.graph.node)}
    classifier = next(n for n in head.model.graph.node if n.name == head.node)
    rest = sorted([*middle.values(), classifier, *([head.pool] if head.pool is not None else []), *head.tail],
                  key=lambda n: position[id(n)])
    try:
        return Projection(head.model, output, dtype, head.with_constant_producers(rest), head.classes)
    except HardenError:
        return None


class _Rows:
    """The top-1 of every row a single-value fault of the projection's output makes: (image, e, value),
    marked while the faults are enumerated, then run through ONNX Runtime once."""

    def __init__(self, projection: Projection, z: np.ndarray) -> None:
        n, e = z.shape
        info = np.iinfo(projection.dtype)
        self.low, levels = int(info.min), int(info.max) - int(info.min) + 1
        if n * e * levels > TABLE_CELLS:
            raise HardenError(f"exact analysis: the projection before the classifier has {n * e * levels:,} rows "
                              f"(image × component × stored value) for {n} images; the analysis allows "
                              f"{max(1, TABLE_CELLS // (e * levels))} images (certify with a smaller --limit)")
        self.projection, self.z = projection, z
        self.wanted = np.zeros((n, e, levels), bool)
        self.top1 = np.zeros((n, e, levels), np.int32)

    def mark(self, rows: np.ndarray, e: np.ndarray, values: np.ndarray) -> None:
        self.wanted[rows, e, values - self.low] = True

    def run(self, more: int) -> int:
        """Runs every marked row; returns how many. `more`: the rows the input faults will run, counted into
        the budget."""
        rows, e, v = np.nonzero(self.wanted)
        n, components = self.z.shape
        cost = (len(rows) + more) * components * self.projection.classes
        if cost > ROW_BUDGET:
            raise HardenError(f"exact analysis: the projection before the classifier needs {len(rows) + more:,} rows "
                              f"run through ONNX Runtime for {n} images ({cost:.1e} multiply-adds); it allows "
                              f"about {max(1, int(n * ROW_BUDGET / cost))} images (certify with a smaller --limit)")
        step = max(1, CHUNK // max(1, self.z.shape[1]))
        for i in range(0, len(rows), step):
            s = slice(i, i + step)
            batch = self.z[rows[s]].copy()
            batch[np.arange(len(batch)), e[s]] = v[s] + self.low
            self.top1[rows[s], e[s], v[s]] = self.projection.top1(batch)
        return len(rows)

    def sdc(self, rows: np.ndarray, e: np.ndarray, values: np.ndarray, top1: np.ndarray) -> np.ndarray:
        """Whether each fault (image rows[i], component e[i] set to values[i]) changes the top-1; a value equal
        to the golden one changes nothing."""
        same = values == self.z[rows, e]
        return ~same & (self.top1[rows, e, values - self.low] != top1[rows])


def analyse_projection(projection: Projection, inputs: np.ndarray, top1: np.ndarray, batch: int = 64,
                       providers: Sequence[str] = ("CPUExecutionProvider",),
                       threads: int = 0) -> list[ExactSiteResult]:
    """Exact SDC counts of every single-bit fault in the projection's weight, bias, input and output, against
    the classifier's golden `top1` on the same `inputs`."""
    layer = projection.layer
    g = golden_state(layer, inputs, batch, providers, threads)
    z = g.y[:, :, 0]  # N × E stored outputs
    if not np.array_equal(projection.top1(z), top1):
        raise HardenError("exact analysis: the nodes after the projection, run on its outputs alone, do not give "
                          "the classifier's top-1")
    table = _Rows(projection, z)
    faults = [_weight_values, *([_bias_values] if layer.bias_name else []), _output_values]
    for values in faults:  # the rows every single-value fault makes, marked
        for _, rows, e, v, _ in values(layer, g.x[:, :, 0], g.acc[:, :, 0], z):
            table.mark(rows, e, v)
    table.run(more=len(z) * g.x.shape[1] * 8 * g.x.dtype.itemsize)
    sites = []
    for values, role, tensor, stored in ((_weight_values, "proj_weight", layer.weight_name, layer.stored_weight),
                                         (_bias_values, "proj_bias", layer.bias_name, layer.bias),
                                         (_output_values, "proj_output", layer.output, z[0].astype(layer.out_dtype))):
        if not tensor:
            continue
        site = ExactSiteResult.for_stored(tensor, role, layer.node, stored, len(z), hits=False)
        for bit, rows, e, v, count in values(layer, g.x[:, :, 0], g.acc[:, :, 0], z):
            site.faults[bit] += count
            site.sdc[bit] += int(table.sdc(rows, e, v, top1).sum())
        sites.append(site)
    return [sites[0], *sites[1:-1], _input(projection, g.x[:, :, 0], g.acc[:, :, 0], top1), sites[-1]]


def _weight_values(layer: IntegerHead, x: np.ndarray, acc: np.ndarray, z: np.ndarray):  # type: ignore[no-untyped-def]
    """For each bit, chunk by chunk: (bit, image, e, faulty z value, faults) of every P[e, j] flip that changes
    z[n, e] (the others change nothing), and how many faults the chunk held."""
    n, features = x.shape
    stored = layer.weight_fc  # F × E
    reach = int(np.abs(x.astype(np.int64) - layer.zx).max(initial=0)) * 2 ** (8 * stored.dtype.itemsize - 1)
    dtype = accumulator_type(acc, reach)
    xz = x.astype(dtype) - dtype(layer.zx)
    step = max(1, CHUNK // max(1, n * features))
    for bit in range(8 * stored.dtype.itemsize):
        dw = (flip_all(stored, bit) - stored.astype(np.int64)).astype(dtype)
        for e0 in range(0, layer.classes, step):
            es = np.arange(e0, min(layer.classes, e0 + step))
            faulty = acc[:, None, es].astype(dtype) + xz[:, :, None] * dw[None, :, es]  # N × F × e
            value = layer.requantise((faulty if dtype == np.int32 else wrap32(faulty))[..., None], es)[..., 0]
            changed = value != z[:, None, es]
            rows, _, k = np.nonzero(changed)
            yield bit, rows, es[k], value[changed], int(value.size)


def _bias_values(layer: IntegerHead, x: np.ndarray, acc: np.ndarray, z: np.ndarray):  # type: ignore[no-untyped-def]
    """As `_weight_values`, for b[e] flips: every image's z[n, e] moves by the same Δb before requantising."""
    n, e = acc.shape
    for bit in range(8 * layer.bias.dtype.itemsize):
        db = flip_all(layer.bias, bit) - layer.bias.astype(np.int64)
        value = layer.requantise(wrap32(acc + db[None, :])[..., None])[..., 0]
        rows, k = np.nonzero(value != z)
        yield bit, rows, k, value[rows, k], n * e


def _output_values(layer: IntegerHead, x: np.ndarray, acc: np.ndarray, z: np.ndarray):  # type: ignore[no-untyped-def]
    """As `_weight_values`, for flips of the stored z[n, e] itself."""
    n, e = z.shape
    stored = z.astype(layer.out_dtype)
    for bit in range(8 * stored.dtype.itemsize):
        rows, k = np.indices(z.shape).reshape(2, -1)
        yield bit, rows, k, flip_all(stored, bit).reshape(-1), n * e


def _input(projection: Projection, x: np.ndarray, acc: np.ndarray, top1: np.ndarray) -> ExactSiteResult:
    """f[n, j] flipped: every component of z[n] moves by Δf·(P[:, j] − zw), so each fault runs its own row."""
    layer = projection.layer
    n, features = x.shape
    site = ExactSiteResult.for_stored(layer.input, "proj_input", layer.node, x[0], n, hits=False)
    step = max(1, CHUNK // max(1, n * layer.classes))
    for bit in range(len(site.faults)):
        dx = flip_all(x, bit) - x.astype(np.int64)  # N × F
        for j0 in range(0, features, step):
            js = np.arange(j0, min(features, j0 + step))
            faulty = wrap32(acc[:, None, :] + dx[:, js, None] * layer.wz[None, js, :])  # N × j × E
            rows = layer.requantise(faulty[..., None])[..., 0]
            sdc = projection.top1(rows) != top1[:, None]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
    return site
