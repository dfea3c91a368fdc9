"""Suffix subgraphs: the part of the model downstream of a fault site, fed from cached tensors.

A fault at tensor T can only change nodes that depend on T, so only those run
per fault. Everything else they read (skip connections, shape arithmetic) is a
fault-free value cached from one prefix run per image batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnx.utils import Extractor

from harden.fi.graphinfo import GraphInfo
from harden.graph.ort import SharedWeights, make_session


class Suffix:
    """Runs the graph from a site tensor to the class scores on a batch of (possibly corrupted) cut tensors."""

    def __init__(self, info: GraphInfo, tensor: str, providers: Sequence[str], opt_level: str,
                 threads: int = 0, shared: SharedWeights | None = None) -> None:
        self.tensor = tensor
        self.inputs = info.cut(tensor)
        self.image_rows = {name: info.image_rows(name) for name in self.inputs}
        self.session: ort.InferenceSession | None = None
        self.weights: dict[str, np.ndarray] = {}  # fed with every run, from the one shared copy
        if tensor != info.scores:
            model = extract(info, self.inputs, [info.scores])
            # one arena for every site's session (make_session): with one each, every site kept its own
            # peak working memory, and a 224 px ResNet-50 campaign held 9.8 GiB (tools/inject_memory.py);
            # and one copy of the weights, where no graph rewrite could make a session's kernels differ
            self.shared = shared if opt_level == "disable" else None
            if self.shared is not None:
                self.weights = feed_conv_weights(model, self.shared)
            self.session = make_session(model, providers=providers, opt_level=opt_level, threads=threads,
                                        spinning=False, shared_arena=True,
                                        shared=self.shared.values if self.shared else None)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Class scores for the fed cut tensors (the site tensor already corrupted)."""
        if self.session is None:
            return feeds[self.tensor]
        return self.session.run(None, {k: feeds[k] for k in self.inputs} | self.weights)[0]


def feed_conv_weights(model: onnx.ModelProto, shared: SharedWeights) -> dict[str, np.ndarray]:
    """Turn the shared initializers that only Convs read into graph inputs; return them by name, to be fed.

    A session keeps no copy of an input, and a Conv computes the same bits from
    a weight fed as from its constant (SharedWeights says why MatMul and Gemm
    weights stay constants).
    """
    graph = model.graph
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type if node.domain in ("", "ai.onnx") else "", position))
    fed = {init.name for init in graph.initializer if init.name in shared.arrays and readers.get(init.name)
           and all(op == "Conv" and position in (1, 2) for op, position in readers[init.name])}
    kept = [init for init in graph.initializer if init.name not in fed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for name in sorted(fed):  # extract() lists only the cut tensors as inputs, whatever the IR version
        array = shared.arrays[name]
        graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                         list(array.shape)))
    return {name: shared.arrays[name] for name in sorted(fed)}


def _value_info(info: GraphInfo, name: str) -> onnx.ValueInfoProto:
    """A value info with the probed dtype and a symbolic batch axis where the tensor has one."""
    t = info.tensors[name]
    dims: list[int | str] = list(t.shape)
    if t.batched and dims:
        dims[0] = "N" if info.fixed_batch is None else info.fixed_batch
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(t.dtype), dims)


def extract(info: GraphInfo, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The subgraph between `inputs` and `outputs`, through onnx.utils.Extractor.

    Intermediate value infos are replaced by probed ones first, so extraction
    never depends on what shape inference could work out.
    """
    model = onnx.ModelProto()
    model.CopyFrom(info.model)
    names = set(inputs) | set(outputs)
    kept = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    model.graph.value_info.extend(_value_info(info, n) for n in sorted(names))
    extractor = Extractor(model)
    sub = extractor.extract_model(list(inputs), list(outputs))
    del sub.graph.output[:]
    sub.graph.output.extend(_value_info(info, n) for n in outputs)
    return sub
