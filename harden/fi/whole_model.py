"""Weight faults that no single layer output carries: the whole model, with the weight fed per fault.

Two kinds of weight need this:
- A weight read by several nodes. It is one stored tensor, so a flipped bit
  reaches every reader: layers tied to one weight, or the layers of an export
  that stored equal tensors once (torch's exporter keeps one copy of identical
  initializers, such as the zero biases of an untrained head, and reads it
  through Identity nodes).
- A weight whose layer output is not one slice per image, such as the
  attention MatMuls of a Swin transformer, whose first axis is images ×
  windows. A suffix fed from cached per-image rows cannot start there.

Neither the additive fast path nor a suffix applies, so each fault runs the
whole model on its own image with the faulty tensor as an input: one forward
pass per fault, what a plain injector pays for every fault.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.fi.graphinfo import GraphInfo
from harden.graph.ort import make_session


class WholeModelWeight:
    """Class scores of the model with one element of weight `name` changed, image by image."""

    def __init__(self, info: GraphInfo, name: str, providers: Sequence[str], opt_level: str,
                 threads: int = 0) -> None:
        self.info, self.name = info, name
        self.weight = info.constants[name]
        model = onnx.ModelProto()
        model.CopyFrom(info.model)
        graph = model.graph
        kept_init = [t for t in graph.initializer if t.name != name]
        del graph.initializer[:]
        graph.initializer.extend(kept_init)
        kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] == name)]
        del graph.node[:]
        graph.node.extend(kept_nodes)
        graph.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(self.weight.dtype), list(self.weight.shape)))
        self.session = make_session(model, providers=providers, opt_level=opt_level, threads=threads,
                                    spinning=False)

    def scores(self, x: np.ndarray, elems: np.ndarray, faulty: np.ndarray) -> np.ndarray:
        """Row i: the scores of image x[i] with weight element elems[i] set to faulty[i]."""
        out = np.empty((len(x), self.info.classes), dtype=self.info.tensors[self.info.scores].dtype)
        faulty = np.asarray(faulty, dtype=self.weight.dtype)  # as stored: a NaN keeps its payload bits
        for i, element in enumerate(elems.tolist()):
            w = self.weight.copy()
            w.flat[element] = faulty[i]
            feeds = {self.info.input_name: x[i:i + 1], self.name: w}
            out[i] = self.session.run([self.info.scores], feeds)[0][0]
        return out
