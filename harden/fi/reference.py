"""Slow reference injections through the whole, unmodified-in-structure model.

These are what the fast engine is proved against: an activation fault is a
Where node spliced in after the producing node, and a weight fault is a copy of
the model with one changed initializer (or Constant) and its own session. They
share no code with the suffix engine or the weight-delta algebra.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.graph.batching import images_per_run
from harden.graph.ort import make_session


def activation_full(model: onnx.ModelProto, x: np.ndarray, tensor: str, elements: Sequence[int],
                    values: Sequence[float], providers: Sequence[str] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Scores of the whole model with element `elements[i]` of `tensor` set to `values[i]` in row i of `x`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    raw = tensor + "__fi_raw"
    found = False
    for node in copy.graph.node:
        for j, out in enumerate(node.output):
            if out == tensor:
                node.output[j] = raw
                found = True
    if not found:
        raise HardenError(f"no node produces {tensor!r}")
    where = helper.make_node("Where", ["__fi_mask", "__fi_value", raw], [tensor], name="__fi_where")
    producer = next(i for i, n in enumerate(copy.graph.node) if raw in n.output)
    copy.graph.node.insert(producer + 1, where)
    input_name = model.graph.input[0].name
    probe = make_session(_exposed(model, tensor), providers, opt_level="disable")
    golden = _rows(probe, [tensor], {input_name: x}, images_per_run(model, len(x)))
    copy.graph.input.extend([helper.make_tensor_value_info("__fi_mask", TensorProto.BOOL, None),
                             helper.make_tensor_value_info("__fi_value", helper.np_dtype_to_tensor_dtype(golden.dtype),
                                                           None)])
    mask = np.zeros(golden.shape, dtype=bool)
    value = np.zeros(golden.shape, dtype=golden.dtype)
    for i, (e, v) in enumerate(zip(elements, values)):  # per image: rows of a folded tensor included
        mask.reshape(len(x), -1)[i, int(e)] = True
        value.reshape(len(x), -1)[i, int(e)] = v
    session = make_session(copy, providers, opt_level="disable")
    feeds = {input_name: x, "__fi_mask": mask, "__fi_value": value}
    return _rows(session, [model.graph.output[0].name], feeds, images_per_run(model, len(x)))


def weight_full(model: onnx.ModelProto, x: np.ndarray, weight: str, element: int, value: float,
                providers: Sequence[str] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Scores of a copy of the model whose `weight` (initializer or Constant) has one element replaced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    target: onnx.TensorProto | None = None
    for init in copy.graph.initializer:
        if init.name == weight:
            target = init
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output[0] == weight:
            target = next(a.t for a in node.attribute if a.name == "value")
    if target is None:
        raise HardenError(f"no initializer or Constant named {weight!r}")
    array = numpy_helper.to_array(target).copy()
    array.flat[int(element)] = value
    target.CopyFrom(numpy_helper.from_array(array, target.name))
    session = make_session(copy, providers, opt_level="disable")
    return _rows(session, [model.graph.output[0].name], {model.graph.input[0].name: x}, images_per_run(model, len(x)))


def _rows(session: Any, outputs: list[str], feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
    """The first output over the fed rows, `step` rows a run: one at a time for a graph whose rows are coupled
    (harden.graph.batching), as it classifies when deployed."""
    n = len(next(iter(feeds.values())))  # images: the first feed is the model input
    if step >= n:
        return session.run(outputs, feeds)[0]
    # a folded tensor's splice has k rows per image
    parts = [session.run(outputs, {k: v[start * (len(v) // n):(start + step) * (len(v) // n)]
                                   for k, v in feeds.items()})[0] for start in range(0, n, step)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _exposed(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    from harden.graph.ort import expose

    return expose(model, [tensor])
