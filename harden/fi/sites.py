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

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
# Ops of a quantised graph (QDQ or QOperator format): their integer tensors are not sites.
QUANTISED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd")
# The storage types a site may have: float32, and float16 in a graph converted to half precision.
SITE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# Which inputs of each compute op may be constant parameters.
_PARAM_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}


@dataclass(frozen=True)
class Site:
    """One tensor that faults are injected into.

    `shape`/`elements` are per image for activations (batch axis dropped) and
    the whole tensor for weights. `input_index` is the node input a weight
    feeds (-1 for activations). `shared` marks a weight read by several nodes:
    it is one site, at its first reader, since a flipped bit in the stored
    tensor reaches every reader (harden.fi.whole_model runs those faults).
    `via` names the Add node through which a separate bias enters the layer
    (MatMul + Add, as exporters write Linear); such a bias has input_index 2.
    `dtype` is how the graph stores the tensor, which fixes the bit patterns a
    fault can flip (harden.fi.faults.resolve_format).
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

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.dtype == "float32":  # as files written before float16 models were read, so that they resume
            del d["dtype"]
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
    sites: list[Site] = []
    weights: set[str] = set()  # a stored tensor is one site, listed at its first reader
    for node in info.nodes:
        if node.op_type == "Constant":
            continue
        outputs = [node.output[0]] if node.op_type in COMPUTE_OPS else (list(node.output) if include_all_tensors else [])
        for out in outputs:
            t = info.tensors.get(out)
            if not out or out not in live or out in info.added or t is None:
                continue
            if not (t.batched or t.fold) or t.dtype not in SITE_DTYPES:
                continue
            shape = t.shape if t.fold else t.shape[1:]  # a fold's k rows are all one image's
            sites.append(Site(out, "activation", out, node.name, node.op_type, shape,
                              int(np.prod(shape, dtype=np.int64)), dtype=t.dtype.name))
        if node.op_type not in COMPUTE_OPS or node.output[0] not in live:
            continue
        for j in _PARAM_INPUTS[node.op_type]:
            if j >= len(node.input) or node.input[j] not in info.constants:
                continue
            name = node.input[j]
            value = info.constants[name]
            if value.dtype not in SITE_DTYPES or name in weights:
                continue
            weights.add(name)
            sites.append(Site(name, "weight", name, node.name, node.op_type, tuple(int(s) for s in value.shape),
                              int(value.size), j, len(info.consumers.get(name, [])) > 1, dtype=value.dtype.name))
        bias = _separate_bias(info, node)
        if bias is not None and bias[1] not in weights:
            add, name = bias
            weights.add(name)
            value = info.constants[name]
            sites.append(Site(name, "weight", name, node.name, node.op_type, tuple(int(s) for s in value.shape),
                              int(value.size), 2, len(info.consumers.get(name, [])) > 1, add.name, value.dtype.name))
    note = quantised_note(info.model)
    if not sites and note:
        raise HardenError(f"{note}; this one has no float site left")
    return sites


def quantised_note(model: onnx.ModelProto) -> str | None:
    """What a user of a quantised graph must know: its int8 tensors are not fault sites, so its faults land in
    the float tensors between them (a QDQ graph's Conv outputs before requantisation, say). None otherwise."""
    ops: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTISED_OPS:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
    if not ops:
        return None
    found = ", ".join(f"{count} {op}" for op, count in ops.items())
    return (f"the graph is quantised ({found}): its integer tensors are not fault sites, only its float ones "
            "(inject the float32 model with --format int8 to emulate int8 storage)")


def layer_node(info: GraphInfo, site: Site) -> onnx.NodeProto:
    """The node whose output a weight fault changes: the layer, or the Add through which its separate bias enters."""
    return info.nodes[info.node_index[site.via or site.node]]


def _separate_bias(info: GraphInfo, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """(Add node, bias name) when the layer's output goes only into an Add with a per-image float constant."""
    readers = info.consumers.get(node.output[0], [])
    if len(readers) != 1 or info.nodes[readers[0]].op_type != "Add" or node.output[0] in {
            o.name for o in info.model.graph.output}:
        return None
    add = info.nodes[readers[0]]
    others = [t for t in add.input if t != node.output[0]]
    if len(others) != 1 or others[0] not in info.constants or info.constants[others[0]].dtype not in SITE_DTYPES:
        return None
    per_image = (1, *info.tensors[node.output[0]].shape[1:])
    try:
        fits = np.broadcast_shapes(per_image, info.constants[others[0]].shape) == per_image
    except ValueError:
        fits = False
    return (add, others[0]) if fits else None


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
