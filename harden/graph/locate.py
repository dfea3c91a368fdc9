"""Find the final classifier behind a model's class-score output.

The walk starts at the class-score output and goes up through nodes that only
reshape or normalise scores (Softmax, LogSoftmax, Identity, Flatten, Reshape,
Squeeze, Dropout) to the node that makes the scores. Supported classifiers:

- Gemm:            s = α·A·op(B) + β·C                        (features A, N×d)
- MatMul (+ Add):  s = A·B + c                                (features A, N×d)
- 1×1 Conv on a 1×1 map (densenet):  s = W * x + b            (features Flatten(x))
- 1×1 Conv [→ ReLU] → GlobalAveragePool (squeezenet): the head replaces the
  whole tail and reads features GlobalAveragePool(x). Without the ReLU this is
  exactly the same linear map (averaging commutes with a 1×1 Conv); with it,
  the original scores are not linear in the pooled features, which is fine for
  a new head but is flagged by `exact_linear = False`.

Everything else is refused with the reason: several outputs and no choice,
weights that are not constants or are shared with other nodes, quantised
classifiers, Conv kernels that are not 1×1, or score producers of other kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from harden.errors import HardenError
from harden.graph.constants import QUANT_OPS, constant_value

PASS_THROUGH = frozenset({"Softmax", "LogSoftmax", "Identity", "Flatten", "Reshape", "Squeeze", "Dropout"})
QUANT_CLASSIFIERS = frozenset({"QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger", "QGemm",
                               "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}) | QUANT_OPS


@dataclass
class ClassifierInfo:
    """The located classifier, by tensor names, with its weights as numpy arrays.

    `weight` is C×d and `bias` is C whatever the node's layout, so that
    `features @ weight.T + bias` gives the scores (exactly when `exact_linear`).
    """

    output: str
    scores: str
    features: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray
    scores_shape: list[int | str | None]
    exact_linear: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def describe(self) -> str:
        return (f"{self.kind} classifier {self.in_features}→{self.num_classes} on features {self.features!r}, "
                f"scores {self.scores!r} → output {self.output!r}")


@dataclass
class Located:
    """The gs objects of a located classifier inside one graph (internal to the passes)."""

    info: ClassifierInfo
    features: gs.Variable
    scores: gs.Variable
    nodes: list[gs.Node]
    pool: bool


def locate_classifier(model: onnx.ModelProto, output: str | None = None) -> ClassifierInfo:
    """Locate the final classifier of `model`; HardenError with the reason when it cannot."""
    return locate_in_graph(import_graph(model), output).info


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """A gs graph of the model with inferred shapes (for the 1×1-map check)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is an aid here; a model it cannot handle is still usable
        inferred = model
    return gs.import_onnx(inferred)


def scores_name(names: list[str], output: str | None) -> str:
    """Which of a model's outputs `names` holds the class scores: the only one, or the one named.

    Every stage asks the same (rewrite and convert here, inject and certify
    through harden.graph.model_input.select_scores): taking the first of several
    silently would measure or replace the wrong tensor.
    """
    if not names:
        raise HardenError("the model has no outputs")
    if output is None:
        if len(names) != 1:
            raise HardenError(f"the model has {len(names)} outputs {names}; say which holds the class scores "
                              "with --output NAME")
        return names[0]
    if output not in names:
        raise HardenError(f"{output!r} is not an output of the model; outputs: {names}")
    return output


def choose_output(graph: gs.Graph, output: str | None) -> gs.Variable:
    """The class-score graph output: the only one, or the one named."""
    name = scores_name([t.name for t in graph.outputs], output)
    return next(t for t in graph.outputs if t.name == name)


def locate_in_graph(graph: gs.Graph, output: str | None = None) -> Located:
    """Locate the classifier inside a gs graph, keeping references to its nodes."""
    out = choose_output(graph, output)
    scores = out
    while True:
        if not scores.inputs:
            raise HardenError(f"output {out.name!r} is not computed by the graph")
        node = scores.inputs[0]
        if node.op not in PASS_THROUGH:
            break
        scores = node.inputs[0]
    quantised = node if node.op in QUANT_CLASSIFIERS else _rescaled_integer_layer(node)
    if quantised is not None:
        raise HardenError(f"the classifier is quantised ({quantised.op} {quantised.name!r}); quantised classifiers "
                          "are not supported: rewrite the float model, then quantise")
    if node.name.startswith("harden/text_head/"):
        raise HardenError("the model already has a text-guided head (from harden rewrite or convert)")
    handlers = {"Gemm": _gemm, "MatMul": _matmul, "Add": _matmul_add, "Conv": _conv_on_1x1,
                "GlobalAveragePool": _conv_gap}
    if node.op not in handlers:
        raise HardenError(f"the class scores {scores.name!r} come from a {node.op} node {node.name!r}; expected "
                          "Gemm, MatMul(+Add) or 1×1 Conv (optionally followed by Softmax, LogSoftmax, Identity, "
                          "Flatten or Reshape)")
    located = handlers[node.op](graph, node)
    located.info.output = out.name
    located.info.scores = scores.name
    located.info.scores_shape = list(scores.shape) if scores.shape is not None else []
    located.scores = scores
    for inner in located.nodes:
        for tensor in inner.outputs:
            if tensor is not scores and (len(tensor.outputs) > 1 or tensor in graph.outputs):
                raise HardenError(f"the classifier's intermediate tensor {tensor.name!r} is also used elsewhere; "
                                  "replacing the classifier would change those uses")
    return located


def _weight(graph: gs.Graph, tensor: gs.Tensor, what: str) -> np.ndarray:
    """A classifier weight: constant, float32 and used by this node only."""
    if len(tensor.outputs) > 1:
        users = ", ".join(repr(n.name or n.op) for n in tensor.outputs)
        raise HardenError(f"the classifier {what} {tensor.name!r} is shared with other nodes ({users}); "
                          "replacing it would change them too")
    value = constant_value(tensor, graph, f"classifier {what}")
    if value.dtype != np.float32:
        raise HardenError(f"the classifier {what} {tensor.name!r} is {value.dtype}; only float32 classifiers "
                          "are rewritten (rewrite the float32 model, then convert the result to float16)")
    return value


def _bias(value: np.ndarray | None, classes: int, what: str) -> np.ndarray:
    if value is None:
        return np.zeros(classes, dtype=np.float32)
    try:
        return np.broadcast_to(value.reshape(-1) if value.size == classes else value, (classes,)).astype(np.float32)
    except ValueError as err:
        raise HardenError(f"the classifier {what} of shape {value.shape} does not broadcast to {classes} "
                          "per-class values") from err


def _info(kind: str, features: gs.Variable, weight: np.ndarray, bias: np.ndarray, exact: bool = True,
          notes: list[str] | None = None) -> ClassifierInfo:
    return ClassifierInfo(output="", scores="", features=features.name, kind=kind,
                          weight=np.ascontiguousarray(weight, dtype=np.float32), bias=bias, scores_shape=[],
                          exact_linear=exact, notes=notes or [])


def _gemm(graph: gs.Graph, node: gs.Node) -> Located:
    if node.attrs.get("transA", 0):
        raise HardenError(f"Gemm {node.name!r} transposes its features (transA=1); not supported")
    features, b = node.inputs[0], node.inputs[1]
    weight = _weight(graph, b, "weight")
    if weight.ndim != 2:
        raise HardenError(f"Gemm {node.name!r} weight has shape {weight.shape}; expected 2-D")
    weight = weight if node.attrs.get("transB", 0) else weight.T
    weight = np.float32(node.attrs.get("alpha", 1.0)) * weight
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = np.float32(node.attrs.get("beta", 1.0)) * _weight(graph, node.inputs[2], "bias")
    return Located(_info("gemm", features, weight, _bias(bias, weight.shape[0], "bias")), features,
                   node.outputs[0], [node], pool=False)


def _matmul_parts(graph: gs.Graph, node: gs.Node) -> tuple[gs.Variable, np.ndarray]:
    features, b = node.inputs
    if isinstance(features, gs.Constant):
        raise HardenError(f"MatMul {node.name!r} multiplies weights by features (W·x); expected features·W")
    weight = _weight(graph, b, "weight")
    if weight.ndim != 2:
        raise HardenError(f"MatMul {node.name!r} weight has shape {weight.shape}; expected 2-D (d×C)")
    if features.shape is not None and len(features.shape) != 2:
        raise HardenError(f"MatMul {node.name!r} features {features.name!r} have rank {len(features.shape)}; "
                          "the classifier must see one feature vector per image (N×d)")
    return features, weight.T


def _matmul(graph: gs.Graph, node: gs.Node) -> Located:
    features, weight = _matmul_parts(graph, node)
    return Located(_info("matmul", features, weight, _bias(None, weight.shape[0], "bias")), features,
                   node.outputs[0], [node], pool=False)


def _rescaled_integer_layer(node: gs.Node) -> gs.Node | None:
    """The MatMulInteger or ConvInteger behind the Cast, the Mul by its scale and the bias Add with which
    quantize_dynamic ends a layer, if `node` is one of those."""
    for _ in range(3):
        if node.op not in ("Add", "Mul", "Cast"):
            return None
        moved = [t.inputs[0] for t in node.inputs if isinstance(t, gs.Variable) and t.inputs]
        cast = next((p for p in moved if p.op == "Cast"), None)
        node = cast or (moved[0] if len(moved) == 1 else None)
        if node is None:
            return None
        if node.op == "Cast":
            producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
            return producer if producer is not None and producer.op in ("MatMulInteger", "ConvInteger") else None
    return None


def _matmul_add(graph: gs.Graph, node: gs.Node) -> Located:
    producers = [t.inputs[0] if t.inputs else None for t in node.inputs]
    idx = [i for i, p in enumerate(producers) if p is not None and p.op == "MatMul"]
    if len(idx) != 1:
        raise HardenError(f"the class scores come from an Add node {node.name!r} that does not add a bias to one "
                          "MatMul; expected Gemm, MatMul(+Add) or 1×1 Conv")
    matmul = producers[idx[0]]
    features, weight = _matmul_parts(graph, matmul)
    bias = _weight(graph, node.inputs[1 - idx[0]], "bias")
    return Located(_info("matmul+add", features, weight, _bias(bias, weight.shape[0], "bias")), features,
                   node.outputs[0], [matmul, node], pool=False)


def _conv_weight(graph: gs.Graph, node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    weight = _weight(graph, node.inputs[1], "weight")
    if weight.ndim != 4 or weight.shape[2:] != (1, 1):
        raise HardenError(f"Conv {node.name!r} has a {weight.shape[2:]} kernel; only a 1×1 Conv can be the "
                          "classifier")
    if node.attrs.get("group", 1) != 1:
        raise HardenError(f"Conv {node.name!r} is grouped; only an ordinary 1×1 Conv can be the classifier")
    if any(p != 0 for p in node.attrs.get("pads", [])) or any(s != 1 for s in node.attrs.get("strides", [])):
        raise HardenError(f"Conv {node.name!r} has padding or strides; only a plain 1×1 Conv is supported")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise HardenError(f"Conv {node.name!r} uses auto_pad; only a plain 1×1 Conv is supported")
    weight = weight[:, :, 0, 0]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = _weight(graph, node.inputs[2], "bias")
    return weight, _bias(bias, weight.shape[0], "bias")


def _spatial_is_1x1(tensor: gs.Tensor) -> bool:
    shape = tensor.shape
    return shape is not None and len(shape) == 4 and shape[2] == 1 and shape[3] == 1


def _conv_on_1x1(graph: gs.Graph, node: gs.Node) -> Located:
    weight, bias = _conv_weight(graph, node)
    features = node.inputs[0]
    if not (_spatial_is_1x1(features) or _spatial_is_1x1(node.outputs[0])):
        raise HardenError(f"Conv {node.name!r} makes the scores but its input {features.name!r} is not known to "
                          f"be a 1×1 map (shape {features.shape}); a 1×1 Conv on a spatial map gives per-pixel "
                          "scores, not a classifier")
    return Located(_info("conv1x1", features, weight, bias), features, node.outputs[0], [node], pool=False)


def _conv_gap(graph: gs.Graph, node: gs.Node) -> Located:
    nodes = [node]
    upstream = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    relu = upstream is not None and upstream.op == "Relu"
    if relu:
        nodes.append(upstream)
        upstream = upstream.inputs[0].inputs[0] if upstream.inputs[0].inputs else None
    if upstream is None or upstream.op != "Conv":
        raise HardenError(f"the class scores come from GlobalAveragePool {node.name!r} over a "
                          f"{upstream.op if upstream else 'graph input'}; only 1×1 Conv [→ ReLU] → "
                          "GlobalAveragePool tails (squeezenet) are supported")
    weight, bias = _conv_weight(graph, upstream)
    nodes.append(upstream)
    features = upstream.inputs[0]
    notes = ["1×1 Conv → ReLU → GlobalAveragePool tail: the head reads GlobalAveragePool of the Conv input, "
             "so the original scores are not a linear function of those features"] if relu else []
    kind = "conv1x1-relu-gap" if relu else "conv1x1-gap"
    return Located(_info(kind, features, weight, bias, exact=not relu, notes=notes), features, node.outputs[0],
                   nodes, pool=True)
