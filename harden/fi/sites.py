"""Fault sites: the activation and weight tensors a campaign may corrupt, and selecting them by name.

A "layer" is one compute node. Its activation site is the node's output; its
weight sites are the constant float tensors it reads (weights and biases).
Sites are listed in graph (topological) order, so `last` is the classifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.graphinfo import GraphInfo
from harden.fi.quantised import (DYNAMIC_LAYERS, INTEGER_DTYPES, QOPERATOR_BIAS_ADD, QOPERATOR_LAYERS,
                                 requantised_output, rescaled_output)
from harden.graph.batching import row_coupling

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose", *QOPERATOR_LAYERS, *DYNAMIC_LAYERS)
# The storage types a site may have: float32, and float16 in a graph converted to half precision; in a
# quantised graph also the integers it stores (harden.fi.quantised).
SITE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
ACTIVATION_DTYPES = (*SITE_DTYPES, np.dtype(np.int8), np.dtype(np.uint8))
# Which inputs of each compute op may be constant parameters.
_PARAM_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), **QOPERATOR_LAYERS,
                 **DYNAMIC_LAYERS}


@dataclass(frozen=True)
class Site:
    """One tensor that faults are injected into.

    `shape`/`elements` are per image for activations (batch axis dropped) and
    the whole tensor for weights. `input_index` is the node input a weight
    feeds (-1 for activations). `shared` marks a weight read by several nodes:
    it is one site, at its first reader, since a flipped bit in the stored
    tensor reaches every reader (harden.fi.whole_model runs those faults).
    `via` names the Add node through which a separate bias enters the layer
    (MatMul + Add, as exporters write Linear; QLinearMatMul + QLinearAdd in a
    QOperator graph); such a bias has input_index 2.
    `dtype` is how the graph stores the tensor, which fixes the bit patterns a
    fault can flip (harden.fi.faults.resolve_format). `decoded` names the
    float tensor a QDQ graph's DequantizeLinear makes of a stored integer
    weight, which is what the layer reads (harden.fi.quantised).
    """

    name: str
    kind: str
    tensor: str
    node: str
    op_type: str
    shape: tuple[int, ...]
    elements: int
    input_index: int = -1
    shared: bool = False
    via: str = ""
    dtype: str = "float32"
    decoded: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.dtype == "float32":  # as files written before float16 models were read, so that they resume
            del d["dtype"]
        if not self.decoded:
            del d["decoded"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Site:
        fields = dict(data)
        fields["shape"] = tuple(int(s) for s in data["shape"])  # type: ignore[union-attr]
        return cls(**fields)  # type: ignore[arg-type]


def list_sites(model: onnx.ModelProto | GraphInfo, include_all_tensors: bool = False) -> list[Site]:
    """Every activation and weight site of the graph that can change the class scores."""
    info = model if isinstance(model, GraphInfo) else GraphInfo(model)
    live = info.reaches(info.scores)
    outputs = {o.name for o in info.model.graph.output}
    sites: list[Site] = []
    seen: set[str] = set()  # a tensor is one site: a stored weight is listed at its first reader
    for node in info.nodes:
        if node.op_type == "Constant":
            continue
        if node.op_type in COMPUTE_OPS:  # the layer's output as stored: requantised (QDQ), rescaled (dynamic)
            out = node.output[0]
            found = rescaled_output if node.op_type in DYNAMIC_LAYERS else requantised_output
            tensors = [found(info.nodes, info.consumers, info.constants, out, outputs) or out]
        else:
            tensors = list(node.output) if include_all_tensors else []
        for out in tensors:
            t = info.tensors.get(out)
            if not out or out not in live or out in info.added or t is None or out in seen:
                continue
            if not (t.batched or t.fold) or t.dtype not in ACTIVATION_DTYPES:
                continue
            seen.add(out)
            shape = t.shape if t.fold else t.shape[1:]  # a fold's k rows are all one image's
            sites.append(Site(out, "activation", out, node.name, node.op_type, shape,
                              int(np.prod(shape, dtype=np.int64)), dtype=t.dtype.name))
        if node.op_type not in COMPUTE_OPS or node.output[0] not in live:
            continue
        params = [(j, node.input[j], "") for j in _PARAM_INPUTS[node.op_type]
                  if j < len(node.input) and node.input[j] in info.constants]
        bias = _separate_bias(info, node) or _qlinear_bias(info, node)
        if bias is not None:
            params.append((2, bias[1], bias[0].name))
        for j, name, via in params:
            site = _weight_site(info, node, name, j, via)
            if site is not None and site.tensor not in seen:
                seen.add(site.tensor)
                sites.append(site)
    return sites


def _weight_site(info: GraphInfo, node: onnx.NodeProto, name: str, index: int, via: str) -> Site | None:
    """The site of parameter `name` of a layer: the constant itself (an integer one in a QOperator layer), or
    in a QDQ graph the stored integer tensor that a DequantizeLinear decodes into it. None for a type no
    fault is drawn in."""
    dq = info.dequantized.get(name)
    stored = dq.stored if dq is not None else name
    value = info.constants[stored]
    via_op = info.nodes[info.node_index[via]].op_type if via else ""
    integer = node.op_type in (*QOPERATOR_LAYERS, *DYNAMIC_LAYERS) or via_op == QOPERATOR_BIAS_ADD[0]  # as stored
    # a decoded one is an integer (find_dequantized)
    if dq is None and value.dtype not in (*SITE_DTYPES, *(INTEGER_DTYPES if integer else ())):
        return None
    readers = len(info.consumers.get(stored, [])) + (len(info.consumers.get(name, [])) - 1 if dq is not None else 0)
    return Site(stored, "weight", stored, node.name, node.op_type, tuple(int(s) for s in value.shape),
                int(value.size), index, readers > 1, via, value.dtype.name, name if dq is not None else "")


def batching_note(model: onnx.ModelProto) -> str | None:
    """What a user of a graph whose batch rows are coupled (harden.graph.batching) must know: its campaign runs
    one image at a time, so it is slower than a batched one. None for other graphs."""
    coupling = row_coupling(model)
    if coupling is None:
        return None
    return (f"each image runs alone: this graph's batch rows depend on each other ({coupling}; a dynamic "
            "quantiser takes one scale over the whole batch), and deployed one image at a time it takes each "
            "image's scale from that image")


def layer_node(info: GraphInfo, site: Site) -> onnx.NodeProto:
    """The node whose output a weight fault changes: the layer, or the Add through which its separate bias enters."""
    return info.nodes[info.node_index[site.via or site.node]]


def _separate_bias(info: GraphInfo, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """(Add node, bias name) when the layer's output goes only into an Add with a per-image float constant
    (in a QDQ graph, through the QuantizeLinear and DequantizeLinear that requantise it; in a dynamically
    quantised one, through the Cast and Mul that rescale it)."""
    outputs = {o.name for o in info.model.graph.output}
    out = node.output[0]
    for op in ("Cast", "Mul") if node.op_type in DYNAMIC_LAYERS else ("QuantizeLinear", "DequantizeLinear"):
        readers = info.consumers.get(out, [])
        if len(readers) == 1 and info.nodes[readers[0]].op_type == op and out not in outputs:
            out = info.nodes[readers[0]].output[0]
    readers = info.consumers.get(out, [])
    if len(readers) != 1 or info.nodes[readers[0]].op_type != "Add" or out in outputs:
        return None
    add = info.nodes[readers[0]]
    others = [t for t in add.input if t != out]
    if len(others) != 1 or others[0] not in info.constants or info.constants[others[0]].dtype not in SITE_DTYPES:
        return None
    return (add, others[0]) if _per_image(info, out, others[0]) else None


def _qlinear_bias(info: GraphInfo, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """(QLinearAdd node, bias name) when a QOperator layer's output goes only into a QLinearAdd with a stored
    per-image integer constant: how quantize_static writes a MatMul's separate bias."""
    op, operands = QOPERATOR_BIAS_ADD
    out = node.output[0]
    readers = info.consumers.get(out, [])
    if node.op_type not in QOPERATOR_LAYERS or len(readers) != 1 or info.nodes[readers[0]].op_type != op:
        return None
    add = info.nodes[readers[0]]
    others = [add.input[j] for j in operands if add.input[j] != out]
    if len(others) != 1 or others[0] not in info.constants or info.constants[others[0]].dtype not in INTEGER_DTYPES:
        return None
    return (add, others[0]) if _per_image(info, out, others[0]) else None


def _per_image(info: GraphInfo, tensor: str, constant: str) -> bool:
    """Whether `constant` broadcasts onto one image's slice of `tensor` without enlarging it."""
    per_image = (1, *info.tensors[tensor].shape[1:])
    try:
        return np.broadcast_shapes(per_image, info.constants[constant].shape) == per_image
    except ValueError:
        return False


def select_sites(sites: Sequence[Site], spec: str | Sequence[str], kinds: Sequence[str] = ("activation", "weight")) -> list[Site]:
    """Sites chosen by `spec`: 'all', 'last' (the classifier node), names, or 're:REGEX'.

    `spec` is a comma-separated string or a list of tokens. A name matches a
    site name, its tensor or its node (so a node name picks its activation and
    weights). The result keeps graph order and has no duplicates.
    """
    for kind in kinds:
        if kind not in ("activation", "weight"):
            raise HardenError(f"unknown site kind {kind!r}; use activation and/or weight")
    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not tokens:
        raise HardenError("no layers selected; use 'all', 'last', names or re:REGEX")
    pool = [s for s in sites if s.kind in kinds]
    chosen: set[str] = set()
    for token in tokens:
        if token == "all":
            matched = [s.name for s in pool]
        elif token == "last":
            compute = [s for s in sites if s.op_type in COMPUTE_OPS and s.kind == "activation"]
            if not compute:
                raise HardenError("the model has no Conv/Gemm/MatMul/ConvTranspose layer for 'last'")
            matched = [s.name for s in pool if s.node == compute[-1].node]
        elif token.startswith("re:"):
            try:
                pattern = re.compile(token[3:])
            except re.error as err:
                raise HardenError(f"bad layer regex {token[3:]!r}: {err}") from err
            matched = [s.name for s in pool if pattern.search(s.name) or pattern.search(s.node)]
        else:
            matched = [s.name for s in pool if token in (s.name, s.tensor, s.node) or (s.via and token == s.via)]
            if not matched:
                known = ", ".join(sorted({s.node for s in sites})[:12])
                raise HardenError(f"unknown layer {token!r} (for kinds {list(kinds)}); known nodes include: {known}")
        if not matched:
            raise HardenError(f"layer selection {token!r} matches no {'/'.join(kinds)} site")
        chosen.update(matched)
    return [s for s in pool if s.name in chosen]


def format_sites(sites: Sequence[Site]) -> str:
    """A table of sites for `--list-sites`."""
    rows = [("site", "kind", "op", "node", "dtype", "shape", "elements")]
    rows += [(s.name + (" (shared)" if s.shared else ""), s.kind, s.op_type, s.node, s.dtype,
              "×".join(map(str, s.shape)) or "scalar", str(s.elements)) for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    return "\n".join("  ".join(c.ljust(w) if i < 6 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)
