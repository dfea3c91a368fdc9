"""Single-node ONNX Runtime sessions: the graph run one node at a time, on whole tensors or on windows.

The cone-of-influence engine (harden.fi.cone) recomputes only the part of each
tensor that a fault can reach, so it must run a node on a crop of its input.
That is exact only if the crop gives the same bits as the whole tensor. At ORT
level 'all', a single Conv computes every output element the same way whatever
the input's spatial size (its NCHWc kernels do; the cone tests rely on it);
at 'disable' it does not (seen with ORT 1.32). So every node, for the golden
run as much as for the windows, runs in its own session at level 'all', and
the golden values the windows are compared with come from the very same
kernels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from harden.fi.graphinfo import GraphInfo
from harden.graph.ort import make_session

# The only level at which a windowed Conv reproduces the whole-tensor Conv bit for bit.
NODE_LEVEL = "all"

Override = tuple[tuple[str, object], ...]


class NodeSessions:
    """Lazily built single-node sessions, keyed by node index and attribute override."""

    def __init__(self, info: GraphInfo, providers: Sequence[str], threads: int = 0) -> None:
        self.info = info
        self.providers = tuple(providers)
        self.threads = threads
        self._sessions: dict[tuple[int, Override], tuple[ort.InferenceSession, list[str], list[str]]] = {}
        self._building = threading.Lock()  # concurrent walks (harden.fi.engine) may ask for the same node

    def _build(self, index: int, override: Override) -> tuple[ort.InferenceSession, list[str], list[str]]:
        info = self.info
        node = info.nodes[index]
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if override:
            changes = dict(override)
            kept = [a for a in copy.attribute if a.name not in changes]
            del copy.attribute[:]
            copy.attribute.extend(kept)
            copy.attribute.extend(helper.make_attribute(k, v) for k, v in changes.items() if v is not None)
        feeds = [t for t in dict.fromkeys(node.input) if t and t not in info.constants]
        inits = [numpy_helper.from_array(info.constants[t], t) for t in dict.fromkeys(node.input)
                 if t and t in info.constants]
        outputs = [o for o in node.output if o]

        def value_info(name: str) -> onnx.ValueInfoProto:
            t = info.tensors[name]
            dims = [f"{name}_d{i}" for i in range(len(t.shape))]
            return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(t.dtype), dims)

        graph = helper.make_graph([copy], f"node_{index}", [value_info(t) for t in feeds],
                                  [value_info(o) for o in outputs], inits)
        model = helper.make_model(graph, opset_imports=list(info.model.opset_import))
        model.ir_version = info.model.ir_version
        session = make_session(model, self.providers, opt_level=NODE_LEVEL, threads=self.threads, spinning=False,
                               shared_arena=True)
        return session, feeds, outputs

    def run(self, index: int, values: dict[str, np.ndarray], override: Override = ()) -> dict[str, np.ndarray]:
        """Run node `index` on `values` (its non-constant inputs); return its outputs by name."""
        key = (index, override)
        if key not in self._sessions:
            with self._building:
                if key not in self._sessions:
                    self._sessions[key] = self._build(index, override)
        session, feeds, outputs = self._sessions[key]
        results = session.run(outputs, {t: values[t] for t in feeds})
        return dict(zip(outputs, results))


def node_pass(sessions: NodeSessions, x: np.ndarray, batch: int, keep: Iterable[str] | None = None,
              seen: Callable[[str, np.ndarray], None] | None = None,
              ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """A fault-free node-by-node run of `x`, `batch` images at a time: each chunk's start and its tensors
    (all of them, or only those in `keep`, plus the scores).

    `seen(name, value)` is called on every tensor as it is made, so that a caller can summarise tensors
    (their ranges) without keeping them: the rest go as soon as their last reader has run.
    """
    info = sessions.info
    wanted = None if keep is None else set(keep) | {info.scores}
    batch = info.run_batch or batch  # a fixed batch, or one image at a time where rows are coupled
    for start in range(0, len(x), batch):
        values: dict[str, np.ndarray] = {info.input_name: x[start:start + batch]}
        if seen is not None:
            seen(info.input_name, values[info.input_name])
        readers = {t: len(c) for t, c in info.consumers.items()}
        for i, node in enumerate(info.nodes):
            if node.op_type == "Constant":
                continue
            made = sessions.run(i, values)
            values.update(made)
            if seen is not None:
                for name, value in made.items():
                    seen(name, value)
            for t in node.input:
                if t in readers:
                    readers[t] -= 1
                    if readers[t] == 0 and t != info.scores and (wanted is not None and t not in wanted):
                        values.pop(t, None)
        yield start, values if wanted is None else {k: v for k, v in values.items() if k in wanted}


def golden_pass(sessions: NodeSessions, x: np.ndarray, batch: int, keep: Iterable[str] | None = None,
                ) -> dict[str, np.ndarray]:
    """Every tensor of a fault-free node-by-node run of `x` (or only those in `keep`, plus the scores).

    Concatenates the per-image tensors of the chunks (a single chunk is taken
    as it is, so a `batch` of len(x) needs no second copy of the block);
    tensors without a batch axis (shape arithmetic) come from the first chunk.
    """
    info = sessions.info
    parts: dict[str, list[np.ndarray]] = {}
    for _, values in node_pass(sessions, x, batch, keep):
        for name, value in values.items():
            parts.setdefault(name, []).append(value)
    out: dict[str, np.ndarray] = {}
    for name, chunks in parts.items():
        out[name] = np.concatenate(chunks) if info.image_rows(name) and len(chunks) > 1 else chunks[0]
    return out
