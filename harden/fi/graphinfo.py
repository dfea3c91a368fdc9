"""What the injector needs to know about a graph: producers, consumers, constants and real tensor shapes.

Shape inference cannot always give every intermediate shape (symbolic dims,
custom ops), and the engine must also know which tensors carry one row per image
(so that they can be cached and re-batched) and which do not (shape arithmetic,
whose value depends on the batch size). Both questions are answered by running
the model once on a batch of 1 and once on a batch of 2 with every tensor
exposed, which is cheap and never wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from harden.errors import HardenError
from harden.fi.quantised import find_dequantized
from harden.graph.batching import row_coupling
from harden.graph.model_input import image_input, input_dtype, select_scores
from harden.graph.ort import expose, make_session


# Each compute op's (activation, weight) inputs; a QOperator layer's weight comes after the input's scale and
# zero point.
_OPERANDS = {"Conv": (0, 1), "ConvTranspose": (0, 1), "Gemm": (0, 1), "MatMul": (0, 1),
             "QLinearConv": (0, 3), "QLinearMatMul": (0, 3), "QGemm": (0, 3),
             "ConvInteger": (0, 1), "MatMulInteger": (0, 1)}

@dataclass(frozen=True)
class TensorInfo:
    """dtype and shape (at batch 1) of one tensor, and whether its first axis is the image batch.

    `fold` is k > 0 for a tensor whose first axis holds k rows per image, image
    after image (a Swin transformer's windows: images × windows): not batched,
    but still one slice per image, so it can be a fault site.
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    batched: bool
    fold: int = 0


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose unnamed nodes get stable names `<op>_<index>`, so every site can name its node."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {n.name for n in copy.graph.node if n.name}
    for i, node in enumerate(copy.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return copy


def bypass_constant_views(model: onnx.ModelProto) -> None:
    """Make readers of Identity(constant) read the constant itself, and drop those Identity nodes (in place);
    likewise a Reshape that is a stored tensor's only reader (`_reshape_in_place`).

    torch's exporter stores equal initializers once and hands each further
    reader an Identity of it (an untrained or BN-folded network's zero biases,
    tied weights). A layer whose weight or bias arrives that way is not a layer
    with constant weights to ONNX Runtime's single-node sessions: it loses its
    prepacked, blocked-layout kernel and runs several times slower. It also
    hid weights read only through an Identity from the site list. After this,
    the graph computes the same values, and a shared stored tensor is simply
    an initializer with several readers, which is one site (harden.fi.sites).
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # a subgraph may read an Identity's output by name from the outer scope: leave the graph as it is
    constant = {t.name for t in graph.initializer}
    constant.update(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output)
    outputs = {o.name for o in graph.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    root: dict[str, str] = {}
    kept = []
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in root:
                node.input[j] = root[name]
        if node.output and node.output[0] not in outputs and node.input and node.input[0] in constant and (
                node.op_type == "Identity" or _reshape_in_place(graph, node, readers)):
            root[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    if root:
        del graph.node[:]
        graph.node.extend(kept)


def _reshape_in_place(graph: onnx.GraphProto, node: onnx.NodeProto, readers: dict[str, int]) -> bool:
    """Store a Reshape's result in its initializer when that Reshape is the initializer's only reader.

    caffe2-era zoo graphs (GoogLeNet's classifier) keep a weight flat and
    reshape it on every run. Element k of the stored tensor is element k of
    the reshaped one, so the stored tensor, under its own name, stays the
    fault site: a flipped bit in it is exactly a flipped bit in the layer's
    weight. Returns whether it did.
    """
    if node.op_type != "Reshape" or len(node.input) < 2 or readers.get(node.input[0]) != 1:
        return False
    stored = next((t for t in graph.initializer if t.name == node.input[0]), None)
    spec = next((t for t in graph.initializer if t.name == node.input[1]), None)
    if stored is None or spec is None or any(a.name == "allowzero" and a.i for a in node.attribute):
        return False
    value = numpy_helper.to_array(stored)
    try:  # a 0 in the shape copies the input's dimension there
        shape = [int(d) if d != 0 else value.shape[i] for i, d in enumerate(numpy_helper.to_array(spec).tolist())]
        reshaped = value.reshape(shape)
    except (ValueError, IndexError, TypeError):
        return False
    stored.CopyFrom(numpy_helper.from_array(reshaped, stored.name))
    for declared in graph.input:  # models before IR 4 list initializers as inputs, with their shapes
        if declared.name == stored.name and declared.type.tensor_type.HasField("shape"):
            del declared.type.tensor_type.shape.dim[:]
            for d in reshaped.shape:
                declared.type.tensor_type.shape.dim.add().dim_value = int(d)
    return True


class GraphInfo:
    """Read-only analysis of a classifier graph with one image input and the class scores as its one output
    (`harden.graph.model_input.select_scores` picks them out of a model with several)."""

    def __init__(self, model: onnx.ModelProto, example: np.ndarray | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.model = named_copy(model)
        bypass_constant_views(self.model)
        graph = self.model.graph
        image = image_input(self.model)
        select_scores(self.model)  # one output, the class scores
        self.input_name = image.name
        self.scores = graph.output[0].name
        self.nodes = list(graph.node)
        self.node_index = {n.name: i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(i)
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        # a QDQ graph's stored integer weights, decoded as the layers read them (harden.fi.quantised)
        self.dequantized = find_dequantized(self.nodes, self.constants)
        for name, dq in self.dequantized.items():
            stored = self.constants[dq.stored]
            self.constants[name] = dq.decode(stored, stored.shape)
        dims = image.type.tensor_type.shape.dim
        first = dims[0] if dims else None
        self.fixed_batch: int | None = first.dim_value if first is not None and first.HasField("dim_value") else None
        # why this graph's batch rows depend on each other (harden.graph.batching), if they do
        self.coupling = row_coupling(model)
        # how many images every run takes: the fixed batch, 1 for a graph whose rows are coupled, or None for any
        self.run_batch: int | None = self.fixed_batch or (1 if self.coupling else None)
        self.tensors = self._probe(image, example, providers)
        self.added: set[str] = set()  # tensors this analysis added to the graph (never fault sites)
        scores = self.tensors.get(self.scores)
        if scores is not None and scores.batched and len(scores.shape) > 2 and set(scores.shape[2:]) == {1}:
            scores = self._flatten_scores(scores)
        if scores is None or len(scores.shape) != 2 or scores.shape[1] < 2 or not scores.batched:
            shape = None if scores is None else list(scores.shape)
            raise HardenError(f"model output {self.scores!r} has shape {shape} at batch 1; "
                              "expected class scores of shape N×C with C ≥ 2")
        self.classes = scores.shape[1]

    def _flatten_scores(self, scores: TensorInfo) -> TensorInfo:
        """Read N×C×1×1 class scores as N×C, through a Flatten added after them, and return their new info.

        A 1×1-Conv classifier (the model zoo's SqueezeNet and DenseNet-121) ends
        in such a tensor. Every engine reads the scores as N×C, so the copy this
        analysis runs gets one more node; the model's own tensors, and so its
        fault sites, are unchanged.
        """
        graph = self.model.graph
        name = f"{self.scores}/harden_flat"
        while name in self.tensors:
            name += "_"
        node = onnx.helper.make_node("Flatten", [self.scores], [name], name=name, axis=1)
        graph.node.append(node)
        out = onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(scores.dtype), None)
        graph.output[0].CopyFrom(out)
        self.node_index[name] = len(self.nodes)
        self.producer[name] = len(self.nodes)
        self.consumers.setdefault(self.scores, []).append(len(self.nodes))
        self.nodes.append(node)
        self.scores = name
        self.added.add(name)
        self.tensors[name] = TensorInfo(scores.dtype, scores.shape[:2], True)
        return self.tensors[name]

    def per_image(self, name: str) -> bool:
        """Whether tensor `name` has one slice per image (the input included), so that it can be cut by rows."""
        return name in self.tensors and self.tensors[name].batched

    def image_rows(self, name: str) -> bool:
        """Whether tensor `name` has rows of its images along its first axis (batched, or folded k rows per
        image), so that a block's chunks are concatenated; otherwise it is one value for the whole run."""
        return name in self.tensors and (self.tensors[name].batched or self.tensors[name].fold > 0)

    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image as the model declares it (from the probe)."""
        return self.tensors[self.input_name].shape[1:]

    def _probe(self, inp: onnx.ValueInfoProto, example: np.ndarray | None,
               providers: Sequence[str]) -> dict[str, TensorInfo]:
        """Run every tensor out at two batch sizes (or the fixed one) to learn dtypes, shapes and batching."""
        dims = inp.type.tensor_type.shape.dim
        if example is not None:
            per_image = tuple(int(d) for d in example.shape[1:])
        else:
            if any(not d.HasField("dim_value") for d in list(dims)[1:]):
                raise HardenError(f"model input {inp.name!r} has symbolic image dimensions; "
                                  "give data so that its shape is known")
            per_image = tuple(int(d.dim_value) for d in list(dims)[1:])
        names = [o for n in self.nodes for o in n.output if o]
        session = make_session(expose(self.model, names), providers=providers, opt_level="disable", spinning=False)
        sizes = [self.fixed_batch] if self.fixed_batch else [1, 2]
        dtype = input_dtype(self.model)
        runs = []
        for b in sizes:
            x = np.zeros((b, *per_image), dtype=dtype)
            values = session.run(names, {self.input_name: x})
            runs.append({n: np.asarray(v) for n, v in zip(names, values)})
        info: dict[str, TensorInfo] = {self.input_name: TensorInfo(dtype, (1, *per_image), True)}
        for name in names:
            first = runs[0][name]
            if self.fixed_batch:
                batched = first.ndim >= 1 and first.shape[0] == self.fixed_batch
                shape = (1, *first.shape[1:]) if batched else first.shape
            else:
                second = runs[1][name]
                batched = (first.ndim >= 1 and second.ndim == first.ndim and first.shape[0] == 1
                           and second.shape[0] == 2 and first.shape[1:] == second.shape[1:])
                shape = first.shape
            info[name] = TensorInfo(first.dtype, tuple(int(s) for s in shape), batched)
        if not self.fixed_batch:
            folded = [n for n in names if not info[n].batched and _doubles(runs[0][n], runs[1][n])]
            for name in _image_major(session, folded, per_image, dtype):
                info[name] = TensorInfo(info[name].dtype, info[name].shape, False, info[name].shape[0])
        return info

    def reaches(self, target: str) -> set[str]:
        """Names of tensors from which `target` can be computed (its ancestors, itself included)."""
        seen = {target}
        stack = [target]
        while stack:
            t = stack.pop()
            if t in self.producer:
                for inp in self.nodes[self.producer[t]].input:
                    if inp and inp not in seen:
                        seen.add(inp)
                        stack.append(inp)
        return seen

    def downstream_nodes(self, tensor: str, through: Callable[[onnx.NodeProto], bool] | None = None) -> set[int]:
        """Indices of the nodes whose value depends on `tensor`; with `through`, only along the nodes it accepts
        (a node it refuses is found, but not gone past)."""
        found: set[int] = set()
        stack = list(self.consumers.get(tensor, []))
        while stack:
            i = stack.pop()
            if i in found:
                continue
            found.add(i)
            if through is None or through(self.nodes[i]):
                for out in self.nodes[i].output:
                    stack.extend(self.consumers.get(out, []))
        return found

    @cached_property
    def multiply_adds(self) -> int:
        """Multiply-adds per image of the compute nodes (Conv, ConvTranspose, Gemm, MatMul, and their integer
        forms, which count the same) at their probed batch-1 shapes; element-wise nodes are not counted."""
        total = 0
        for node in self.nodes:
            if node.op_type not in _OPERANDS or not node.output:
                continue
            out = self.tensors.get(node.output[0])
            if out is None:
                continue
            out_elems = int(np.prod(out.shape[1:] if out.batched else out.shape, dtype=np.int64))
            x, weight = (node.input[j] if j < len(node.input) else "" for j in _OPERANDS[node.op_type])
            if "Conv" in node.op_type:
                w = self.constants.get(weight)
                if w is None:
                    continue
                per_output = int(np.prod(w.shape[1:], dtype=np.int64))
                if node.op_type == "ConvTranspose":
                    per_output = int(w.shape[0] * np.prod(w.shape[2:], dtype=np.int64)) // max(1, int(w.shape[1]))
            else:
                a = self.tensors.get(x)
                b = self.constants.get(weight)
                if b is not None:
                    trans_b = any(at.name == "transB" and at.i for at in node.attribute)
                    per_output = int(b.shape[1] if trans_b and node.op_type in ("Gemm", "QGemm") else b.shape[0])
                elif a is not None and a.shape:
                    per_output = int(a.shape[-1])
                else:
                    continue
            total += out_elems * per_output
        return total

    @property
    def macs_per_node(self) -> float:
        """Multiply-adds per node of one image's forward pass, on average: how much arithmetic each ORT call of a
        node-by-node run carries against its fixed cost."""
        return self.multiply_adds / max(1, len(self.nodes))

    def suffix_nodes(self, tensor: str) -> set[int]:
        """The nodes a suffix from `tensor` runs: those downstream of it, plus the producers of the shape
        arithmetic they read (which has no batch axis, so it cannot be cached per image and re-batched).

        Remembered per tensor: sizing, the evaluation pass and the runners all ask, and on a graph of
        thousands of nodes (a Swin transformer) each answer takes a while.
        """
        if not hasattr(self, "_suffix_nodes"):
            self._suffix_nodes: dict[str, frozenset[int]] = {}
        if tensor not in self._suffix_nodes:
            nodes = self.downstream_nodes(tensor)
            initializers = self.constants_initializers()
            while True:
                produced = {o for i in nodes for o in self.nodes[i].output}
                fed = {inp for i in nodes for inp in self.nodes[i].input
                       if inp and inp not in produced and inp not in initializers and inp != tensor}
                # never the site's own producer: a fault in one of its outputs leaves the others as they were
                pull = [t for t in fed if t in self.producer and not self.tensors[t].batched
                        and self.nodes[self.producer[t]].op_type != "Constant"
                        and tensor not in self.nodes[self.producer[t]].output]
                if not pull:
                    break
                nodes.update(self.producer[t] for t in pull)
            self._suffix_nodes[tensor] = frozenset(nodes)
        return set(self._suffix_nodes[tensor])

    def cut(self, tensor: str) -> list[str]:
        """Tensors a suffix starting at `tensor` must be fed: `tensor` plus everything its nodes read from outside.

        Skip connections appear here as the other operands of the merge nodes.
        A crossing tensor without a batch axis (shape arithmetic) cannot be
        re-batched, so its producer joins the suffix, until every fed tensor is
        per-image. The one exception is another output of the site's own
        producer (a DynamicQuantizeLinear's scale beside its quantised values):
        it is fed whole, which is exact since a graph with such tensors runs
        one image at a time (harden.graph.batching).
        """
        nodes = self.suffix_nodes(tensor)
        produced = {o for i in nodes for o in self.nodes[i].output}
        fed = {inp for i in nodes for inp in self.nodes[i].input
               if inp and inp not in produced and inp not in self.constants_initializers()}
        fed.discard(tensor)
        constant_outputs = {t for t in fed if t in self.producer and self.nodes[self.producer[t]].op_type == "Constant"}
        return [tensor, *sorted(fed - constant_outputs)]

    def constants_initializers(self) -> set[str]:
        """Names of the initializers (fed by the session itself, never cached)."""
        if not hasattr(self, "_init_names"):
            self._init_names = {t.name for t in self.model.graph.initializer}
        return self._init_names


def _doubles(one: np.ndarray, two: np.ndarray) -> bool:
    """Whether a float tensor's first axis doubles from batch 1 to batch 2 (a candidate images × k fold)."""
    return (one.dtype.kind == "f" and one.ndim >= 1 and two.ndim == one.ndim and one.shape[0] > 1
            and two.shape[0] == 2 * one.shape[0] and one.shape[1:] == two.shape[1:])


def _image_major(session: ort.InferenceSession, names: list[str], per_image: tuple[int, ...],
                 dtype: np.dtype) -> list[str]:
    """The `names` whose batch-2 value is the two images' batch-1 values stacked (image-major folding).

    Shapes cannot tell images × k from k × images, so two different images are
    run alone and together; a fold must keep each image's rows together.
    """
    if not names:
        return []
    pair = np.random.default_rng(0).standard_normal((2, *per_image)).astype(dtype)
    inp = session.get_inputs()[0].name
    both = session.run(names, {inp: pair})
    alone = [session.run(names, {inp: pair[i:i + 1]}) for i in range(2)]
    found = []
    for j, name in enumerate(names):
        k = len(alone[0][j])
        stacked = np.concatenate([alone[0][j], alone[1][j]])
        differ = not np.allclose(alone[0][j], alone[1][j], rtol=1e-3, atol=1e-5, equal_nan=True)
        if differ and np.allclose(both[j], stacked, rtol=1e-4, atol=1e-5, equal_nan=True) and len(both[j]) == 2 * k:
            found.append(name)
    return found
