"""The graph-pass protocol, the shared entry/exit of every pass, and the pass registry.

A pass has a `name`, a docstring stating its maths, `check(model) -> reason | None`
that refuses without side effects, and `run(model) -> new model` that never
mutates its input. Every pass converts to onnx_graphsurgeon on entry and leaves
through `finish`, which cleans up, sorts, restores what graphsurgeon does not
carry (IR version, producer, metadata), records provenance in
`metadata_props` and runs onnx.checker. Each pass then checks its own output
numerically against a reference with ONNX Runtime before returning it.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from harden import __version__
from harden.errors import HardenError
from harden.graph.onnx_io import get_metadata, set_metadata
from harden.graph.ort import expose, make_session

PASSES_KEY = "harden.passes"


class GraphPass(Protocol):
    """What every pass provides (DESIGN convention 2)."""

    name: str

    def check(self, model: onnx.ModelProto) -> str | None:
        """Why the pass cannot run on `model`, or None."""

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A new, hardened model; `model` is left untouched."""

    def config(self) -> dict[str, Any]:
        """The settings recorded in the output's provenance."""


def finish(graph: gs.Graph, source: onnx.ModelProto, pass_name: str, config: dict[str, Any],
           extra_metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """gs graph → checked ModelProto carrying the source's metadata plus this pass's provenance."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    # The new nodes need nothing newer than the source's IR, except that graphsurgeon writes initializers
    # without listing them as graph inputs, which IR 3 (ONNX 1.3) did not allow; IR 4 goes with opset 9.
    model.ir_version = max(source.ir_version, 4)
    model.producer_name = source.producer_name
    model.producer_version = source.producer_version
    model.domain = source.domain
    model.model_version = source.model_version
    model.doc_string = source.doc_string
    for entry in source.metadata_props:
        model.metadata_props.add(key=entry.key, value=entry.value)
    record = {"pass": pass_name, "harden": __version__, "config": config}
    history = _history(source)
    history.append(record)
    set_metadata(model, {"harden.version": __version__, "harden.pass": pass_name,
                         "harden.config": config, PASSES_KEY: history, **(extra_metadata or {})})
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"pass {pass_name} produced an invalid model: {err}") from err
    return model


def update_config(model: onnx.ModelProto, config: dict[str, Any]) -> None:
    """Replace the config `finish` recorded, once the pass has measured what it records (parity, bounds)."""
    history = _history(model)
    if history:
        history[-1]["config"] = config
    set_metadata(model, {"harden.config": config, PASSES_KEY: history})


def _history(model: onnx.ModelProto) -> list[dict[str, Any]]:
    text = get_metadata(model).get(PASSES_KEY)
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so no later step can touch the caller's model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def random_inputs(model: onnx.ModelProto, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal float inputs; symbolic dimensions become `batch` (first) or 1."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        ttype = inp.type.tensor_type
        if ttype.elem_type != onnx.TensorProto.FLOAT:
            raise HardenError(f"input {inp.name!r} is not float32; only float image inputs are supported")
        dims = [d.dim_value if d.HasField("dim_value") else (batch if i == 0 else 1)
                for i, d in enumerate(ttype.shape.dim)]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def run_exposed(model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Values of inner tensors of `model` for `feeds`, graph optimisations at 'basic'."""
    session = make_session(expose(model, tensors), opt_level="basic")
    return session.run(tensors, feeds)
