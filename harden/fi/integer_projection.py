"""The projection before an integer classifier (the text head's z = P·f + b), decided exactly.

In the int8 text head the classifier reads ẑ = z/‖z‖ requantised, and z is the
stored output of a projection that ONNX Runtime computes from the stored input
f, weight P and bias b: an integer QGemm, or (where ORT leaves a QDQ graph's
projection unfused) a float Gemm between DequantizeLinear and QuantizeLinear.
Each component z[n, e] depends only on row e of P and on b[e]. So a flip in
P[e, j] or in b[e] changes one stored value of z, and ORT computes that value
for every e at once: one run of the projection's own nodes with every row's
element j flipped (or every bias flipped) gives E faults per image. A flip in
the stored z[n, e] changes that value directly. Everything after z (the norm,
the requantisation, the classifier and its tail) is a function of the row of E
stored values alone, so each such fault's outcome is the top-1 of one row, z[n]
with z[n, e] set to the faulty value: each distinct (image, e, value) runs
through ORT's own nodes once, shared by every fault that reaches it. A flip in
f[n, j] moves every component of z[n], so its row runs on its own.

ORT computes every value here with the graph's own kernels, so the analysis is
exact in float as in integers; the projection's and the rest's golden outputs
must reproduce the model's bit for bit, or the analysis is refused. Any layer
whose stored output alone reaches the classifier counts as its projection (the
text head's, or an MLP head's first layer); one reached through a residual sum,
a pool or a convolution does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from harden.errors import HardenError
from harden.fi.exact import ExactSiteResult
from harden.fi.integer_head import IntegerHead, constant_producers, flip_all, part_session, wrap32
from harden.fi.integer_judges import CHUNK, Golden
from harden.graph.ort import expose
from harden.graph.parallel import run_model

# the layers a projection may be, with the positions of (input, weight, bias) where the layer reads them itself
PROJECTIONS = {"QGemm": (0, 3, 6), "QLinearMatMul": (0, 3, None), "Gemm": (0, 1, 2), "MatMul": (0, 1, None)}
# the nodes around a float projection in a QDQ graph, between its stored tensors and the layer
AROUND = frozenset({"DequantizeLinear", "QuantizeLinear", "Add"})
# ops that end the walk back from the classifier without a projection: a convolution, a pool, a join
BARRIERS = frozenset({"QLinearConv", "Conv", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                      "Concat", "QLinearGlobalAveragePool", "GlobalAveragePool"})
# the rows a projection's table may hold (image × component × stored value): 1,365 images of a 384-d text head
TABLE_CELLS = 1 << 27
# operations the rows may take in all (`Projection.row_cost`), counting E for the nodes ORT runs from z to
# ẑ and C per component of ẑ summed: all E with few classes, else CHANGED (a few for the small changes most
# faults make): a few minutes at most (the demo's text head on 458 images: 2.5e10)
ROW_BUDGET = 2 * 10**11
CHANGED = 8
# up to this many classes ORT runs every row from z to the scores; beyond, only to ẑ (`Projection.top1`)
DENSE_CLASSES = 64


class Projection:
    """The projection's stored tensors and three ONNX Runtime sessions of the graph's own nodes: the stored
    output z from the stored input, weight and bias fed to it; the classifier's stored input ẑ from z; and
    the scores from z (`rest`: those nodes). Its attributes are named as an IntegerHead's (input, output,
    weight_name, bias_name, op, node)."""

    def __init__(self, head: IntegerHead, output: str, layer: onnx.NodeProto, inputs: dict[str, str],
                 types: dict[str, int], nodes: list[onnx.NodeProto], middle: list[onnx.NodeProto],
                 rest: list[onnx.NodeProto]) -> None:
        model = head.model
        stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        self.model, self.head, self.op, self.node = model, head, layer.op_type, layer.name
        self.input, self.output, self.weight_name = inputs["input"], output, inputs["weight"]
        self.bias_name = inputs.get("bias", "")
        self.stored_weight = stored[self.weight_name]
        self.bias = stored[self.bias_name] if self.bias_name else np.zeros(0, np.int32)
        if self.stored_weight.ndim != 2 or (self.bias_name and self.bias.ndim != 1):
            raise HardenError(f"exact analysis: the projection {layer.op_type} {layer.name!r} has a "
                              f"{self.stored_weight.ndim}-D weight")
        trans_b = any(a.name == "transB" and a.i for a in layer.attribute)
        self.rows_are_outputs = layer.op_type in ("Gemm", "QGemm") and trans_b  # P stored E × F, else F × E
        kinds = {t.name: t.data_type for t in model.graph.initializer}
        fed = {self.input: types["input"], self.weight_name: kinds[self.weight_name],
               **({self.bias_name: kinds[self.bias_name]} if self.bias_name else {})}
        self._project = part_session(model, nodes, fed, (output, types["output"]))
        self._middle = part_session(model, middle, {output: types["output"]},
                                (head.input, helper.np_dtype_to_tensor_dtype(head.in_dtype)))
        self._rest = part_session(model, rest, {output: types["output"]},
                              (model.graph.output[0].name, model.graph.output[0].type.tensor_type.elem_type))
        self.nodes, self.rest = nodes, rest
        self.golden: Golden | None = None

    def project(self, f: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """ORT's stored z (N × E) of stored inputs `f` (N × F) with the stored `weight` and `bias`."""
        feed = {self.input: f, self.weight_name: weight, **({self.bias_name: bias} if self.bias_name else {})}
        return np.asarray(self._project.run(None, feed)[0]).reshape(len(f), -1)

    def classifier_input(self, z: np.ndarray) -> np.ndarray:
        """ORT's stored ẑ of rows of stored z (R × E): the nodes between them (the norm, the requantisation)."""
        return np.asarray(self._middle.run(None, {self.output: z})[0]).reshape(len(z), -1)

    def top1(self, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The top-1 class of rows of stored z (R × E), each a faulty copy of image images[i]'s.

        With few classes ORT runs every node from z to the scores. With many, the classifier's product
        would cost E·C per row, so ORT computes only ẑ: a single changed z moves a few of its components
        (more as the change grows), the classifier's accumulators move by Σ Δẑ[i]·(W[:, i] − zw) over
        those alone (with the change of their pairs' saturation where this CPU's kernel saturates), and its
        exact arithmetic (harden.fi.integer_head) and judge give the top-1."""
        assert self.golden is not None
        head, g = self.head, self.golden
        if self.dense:
            return np.concatenate([np.argmax(np.asarray(self._rest.run(None, {self.output: rows[i:i + 4096]})[0])
                                             .reshape(len(rows[i:i + 4096]), -1), axis=1)
                                   for i in range(0, len(rows), 4096)]) if len(rows) else np.zeros(0, np.int64)
        moved = self.classifier_input(rows).astype(np.int64)
        delta = moved - g.x[images, :, 0]
        # what a saturating kernel's pairs change by (harden.fi.integer_kernel); zeros for an exact one
        acc = g.acc[images, :, 0] + head.kernel.rows_change(g.x[images, :, 0], moved, head.weight_fc)
        if 8 * np.count_nonzero(delta) > delta.size:  # most components moved (an input fault's rows): one
            # product, in float64 and exact (every partial sum is an integer below 2^53)
            acc += (delta.astype(np.float64) @ head.wz.astype(np.float64)).astype(np.int64)
            return g.judge.winners(head.requantise(wrap32(acc)[..., None])[..., 0])
        r, i = np.nonzero(delta)  # by row
        per = max(1, CHUNK // max(1, head.classes))
        for k0 in range(0, len(r), per):  # contributions of `per` changed components at a time
            k = slice(k0, k0 + per)
            contribution = delta[r[k], i[k]][:, None] * head.wz[i[k]]
            starts = np.flatnonzero(np.r_[True, r[k][1:] != r[k][:-1]])
            acc[r[k][starts]] += np.add.reduceat(contribution, starts, axis=0)
        return g.judge.winners(head.requantise(wrap32(acc)[..., None])[..., 0])

    @property
    def dense(self) -> bool:
        """Whether a row's scores are cheaper to recompute whole (few classes) than component by component."""
        return self.head.classes <= DENSE_CLASSES

    def row_cost(self) -> int:
        """Operations per row, for the budget: ORT's nodes from z to ẑ, then the classifier's update."""
        components = self.head.wz.shape[0]
        return components + (components if self.dense else CHANGED) * self.head.classes

    def flip_column(self, bit: int, j: int) -> np.ndarray:
        """The weight with element j of every output's row flipped: E faults, one per component of z."""
        weight = self.stored_weight.copy()
        view = weight if self.rows_are_outputs else weight.T  # E × F
        view[:, j] = flip_all(view[:, j], bit).astype(weight.dtype)
        return weight


def _zero_point_type(model: onnx.ModelProto, node: onnx.NodeProto, at: int) -> int:
    """The ONNX type of the stored integers a quantisation parameter at input `at` describes (uint8 if absent)."""
    name = node.input[at] if at < len(node.input) else ""
    return next((t.data_type for t in model.graph.initializer if t.name == name), onnx.TensorProto.UINT8)


def find_projection(head: IntegerHead) -> Projection | None:
    """The layer whose stored output alone the classifier reads, through nodes that read nothing else, or None.
    A projection whose weight and bias are not stored constants is not analysed."""
    if head.pool is not None:  # a pooled map is not a vector a projection makes
        return None
    constant, _ = constant_producers(head.model)
    producer = {o: n for n in head.model.graph.node for o in n.output if o}
    middle: dict[str, onnx.NodeProto] = {}
    outputs: set[str] = set()
    pending = [head.input]
    found = None
    while pending:
        tensor = pending.pop()
        node = producer.get(tensor)
        if node is None or node.op_type in BARRIERS or len(middle) > 64:
            return None
        made = _projection_nodes(head, tensor, producer, constant) if node.op_type in (
            "QGemm", "QLinearMatMul", "QuantizeLinear") else None
        if made is not None:  # a stored tensor that a layer makes: the projection's output
            outputs.add(tensor)
            found = made
        elif node.name not in middle:
            middle[node.name] = node
            pending.extend(t for t in node.input if t and t not in constant)
    if len(outputs) != 1 or found is None:
        return None
    (output,) = outputs
    layer, inputs, types, nodes = found
    position = {id(n): i for i, n in enumerate(head.model.graph.node)}
    between = sorted(middle.values(), key=lambda n: position[id(n)])
    classifier = next(n for n in head.model.graph.node if n.name == head.node)
    try:
        return Projection(head, output, layer, inputs, types, head.with_constant_producers(nodes),
                          head.with_constant_producers(between),
                          head.with_constant_producers([*between, classifier, *head.tail]))
    except HardenError:
        return None


def _projection_nodes(head: IntegerHead, output: str, producer: dict[str, onnx.NodeProto], constant: set[str]
                      ) -> tuple[onnx.NodeProto, dict[str, str], dict[str, int], list[onnx.NodeProto]] | None:
    """The layer that makes the stored `output`, the stored tensors it reads (input, weight, bias), the types
    of its stored input and output, and the nodes from them to `output`; None unless it reads one activation
    and stored constants."""
    stored = {t.name for t in head.model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    layer: onnx.NodeProto | None = None
    roles: dict[str, str] = {}
    types: dict[str, int] = {}
    pending = [output]
    while pending:  # from the stored output back to the layer, through a QuantizeLinear (and a bias Add)
        node = producer.get(pending.pop())
        if node is None or node.op_type not in PROJECTIONS and node.op_type not in AROUND:
            return None
        if any(node is n for n in nodes):
            continue
        nodes.append(node)
        if node.op_type in PROJECTIONS:  # its stored input, weight and bias: below
            if layer is not None:
                return None
            layer = node
        else:
            pending.extend(t for t in node.input if t and t not in constant)
    if layer is None:
        return None
    positions = PROJECTIONS[layer.op_type]
    for role, at in zip(("input", "weight", "bias"), positions):
        if at is None or at >= len(layer.input) or not layer.input[at]:
            continue
        tensor = layer.input[at]
        source = producer.get(tensor)
        if source is not None and source.op_type == "DequantizeLinear":
            tensor = source.input[0]  # the stored integers the float layer dequantises
            if role == "input":
                types["input"] = _zero_point_type(head.model, source, 2)
        elif role == "input":
            types["input"] = _zero_point_type(head.model, layer, 2)
        if (role == "input") == (tensor in stored):
            return None
        roles[role] = tensor
    integers = {t.name: t.data_type for t in head.model.graph.initializer}
    if "weight" not in roles or "input" not in roles or any(
            onnx.helper.tensor_dtype_to_np_dtype(integers[roles[r]]).kind not in "iu" for r in ("weight", "bias")
            if r in roles):
        return None
    nodes.extend(producer[t] for t in (layer.input[i] for i in positions if i is not None and i < len(layer.input))
                 if t in producer and producer[t] not in nodes and producer[t].op_type == "DequantizeLinear")
    maker = producer[output]
    types["output"] = _zero_point_type(head.model, maker, {"QuantizeLinear": 2, "QGemm": 8, "QLinearMatMul": 7}.get(
        maker.op_type, len(maker.input)))
    position = {id(n): i for i, n in enumerate(head.model.graph.node)}
    return layer, roles, types, sorted(nodes, key=lambda n: position[id(n)])


class _Rows:
    """The top-1 of every row a single-value fault of the projection's output makes: (image, e, value),
    marked while the faults are enumerated, then run through ONNX Runtime once."""

    def __init__(self, projection: Projection, z: np.ndarray) -> None:
        n, e = z.shape
        info = np.iinfo(z.dtype)
        self.low, levels = int(info.min), int(info.max) - int(info.min) + 1
        if n * e * levels > TABLE_CELLS:
            raise HardenError(f"exact analysis: the projection before the classifier has {n * e * levels:,} rows "
                              f"(image × component × stored value) for {n} images; the analysis allows "
                              f"{max(1, TABLE_CELLS // (e * levels))} images (certify with a smaller --limit)")
        self.projection, self.z = projection, z
        self.wanted = np.zeros((n, e, levels), bool)
        self.top1 = np.zeros((n, e, levels), np.int32)

    def mark(self, rows: np.ndarray, e: np.ndarray, values: np.ndarray) -> None:
        self.wanted[rows, e, values.astype(np.int64) - self.low] = True

    def run(self, more: int) -> None:
        """Runs every marked row. `more`: the rows the input faults will run, counted into the budget."""
        rows, e, v = np.nonzero(self.wanted)
        n, components = self.z.shape
        cost = (len(rows) + more) * self.projection.row_cost()
        if cost > ROW_BUDGET:
            raise HardenError(f"exact analysis: the projection before the classifier needs {len(rows) + more:,} rows "
                              f"run for {n} images (about {cost:.1e} operations); it allows about "
                              f"{max(1, int(n * ROW_BUDGET / cost))} images (certify with a smaller --limit)")
        step = max(1, CHUNK // max(1, components))
        for i in range(0, len(rows), step):
            s = slice(i, i + step)
            batch = self.z[rows[s]].copy()
            batch[np.arange(len(batch)), e[s]] = (v[s] + self.low).astype(self.z.dtype)
            self.top1[rows[s], e[s], v[s]] = self.projection.top1(batch, rows[s])

    def sdc(self, rows: np.ndarray, e: np.ndarray, values: np.ndarray, top1: np.ndarray) -> np.ndarray:
        """Whether each fault (image rows[i], component e[i] set to values[i]) changes the top-1; a value equal
        to the golden one changes nothing."""
        same = values == self.z[rows, e]
        return ~same & (self.top1[rows, e, values.astype(np.int64) - self.low] != top1[rows])


Faults = Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]


def analyse_projection(projection: Projection, inputs: np.ndarray, golden: Golden, batch: int = 64,
                       providers: Sequence[str] = ("CPUExecutionProvider",),
                       threads: int = 0) -> list[ExactSiteResult]:
    """Exact SDC counts of every single-bit fault in the projection's weight, bias, input and output, against
    the classifier's `golden` state on the same `inputs`."""
    projection.golden, top1 = golden, golden.top1
    names = [projection.input, projection.output]
    f, z = run_model(expose(projection.model, names), inputs, names, "disable", batch, threads, providers)
    f, z = f.reshape(len(inputs), -1), z.reshape(len(inputs), -1)
    if not np.array_equal(projection.project(f, projection.stored_weight, projection.bias), z):
        raise HardenError(f"exact analysis: the projection {projection.op} {projection.node!r}, run on its stored "
                          "input alone, does not give its stored output")
    if not np.array_equal(projection.classifier_input(z), golden.x[:, :, 0]) or not np.array_equal(
            projection.top1(z, np.arange(len(z))), top1):
        raise HardenError("exact analysis: the nodes after the projection, run on its outputs alone, do not give "
                          "the classifier's input and top-1")
    table = _Rows(projection, z)
    enumerations = [("proj_weight", projection.weight_name, projection.stored_weight, _weight_faults),
                    ("proj_bias", projection.bias_name, projection.bias, _bias_faults),
                    ("proj_output", projection.output, z[0], _output_faults)]
    enumerations = [e for e in enumerations if e[1]]
    for *_, faults in enumerations:  # the rows every single-value fault makes, marked
        for _, rows, e, v, _ in faults(projection, f, z):
            table.mark(rows, e, v)
    table.run(more=f.size * 8 * f.dtype.itemsize)
    sites = []
    for role, tensor, stored, faults in enumerations:
        site = ExactSiteResult.for_stored(tensor, role, projection.node, stored, len(z), hits=False)
        for bit, rows, e, v, count in faults(projection, f, z):
            site.faults[bit] += count
            site.sdc[bit] += int(table.sdc(rows, e, v, top1).sum())
        sites.append(site)
    return [*sites[:-1], _input(projection, f, top1), sites[-1]]


def _changed(bit: int, z: np.ndarray, faulty: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int]:
    rows, e = np.nonzero(faulty != z)
    return bit, rows, e, faulty[rows, e], int(faulty.size)


def _weight_faults(projection: Projection, f: np.ndarray, z: np.ndarray) -> Faults:
    """(bit, image, e, faulty z value, faults) of every P[e, j] flip that changes z[n, e], E faults per run."""
    features = f.shape[1]
    for bit in range(8 * projection.stored_weight.dtype.itemsize):
        for j in range(features):
            yield _changed(bit, z, projection.project(f, projection.flip_column(bit, j), projection.bias))


def _bias_faults(projection: Projection, f: np.ndarray, z: np.ndarray) -> Faults:
    """As `_weight_faults`, for b[e] flips: every bias flipped in one run."""
    for bit in range(8 * projection.bias.dtype.itemsize):
        bias = flip_all(projection.bias, bit).astype(projection.bias.dtype)
        yield _changed(bit, z, projection.project(f, projection.stored_weight, bias))


def _output_faults(projection: Projection, f: np.ndarray, z: np.ndarray) -> Faults:
    """As `_weight_faults`, for flips of the stored z[n, e] itself."""
    for bit in range(8 * z.dtype.itemsize):
        yield _changed(bit, z, flip_all(z, bit).astype(z.dtype))


def _input(projection: Projection, f: np.ndarray, top1: np.ndarray) -> ExactSiteResult:
    """f[n, j] flipped: every component of z[n] moves, so each fault runs its own row."""
    n, features = f.shape
    site = ExactSiteResult.for_stored(projection.input, "proj_input", projection.node, f[0], n, hits=False)
    step = max(1, CHUNK // max(1, n * features))
    for bit in range(len(site.faults)):
        flipped = flip_all(f, bit).astype(f.dtype)
        for j0 in range(0, features, step):
            js = np.arange(j0, min(features, j0 + step))
            rows = np.repeat(f[:, None, :], len(js), axis=1)  # N × j × F
            rows[:, np.arange(len(js)), js] = flipped[:, js]
            faulty = projection.project(rows.reshape(-1, features), projection.stored_weight, projection.bias)
            images = np.repeat(np.arange(n), len(js))
            sdc = projection.top1(faulty, images).reshape(n, len(js)) != top1[:, None]
            site.faults[bit] += int(sdc.size)
            site.sdc[bit] += int(sdc.sum())
    return site
