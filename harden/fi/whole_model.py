"""Faults that no per-image suffix can start from: the whole model, run with the fault fed in.

Three kinds of site need this:
- A weight read by several nodes. It is one stored tensor, so a flipped bit
  reaches every reader: layers tied to one weight, or the layers of an export
  that stored equal tensors once (torch's exporter keeps one copy of identical
  initializers, such as the zero biases of an untrained head, and reads it
  through Identity nodes).
- A weight whose layer output is not one slice per image, such as the
  attention MatMuls of a Swin transformer, whose first axis is images ×
  windows. Cached rows of it cannot be cut per image and re-batched.
- An activation of that kind (harden.fi.graphinfo calls it a fold).

One session serves all of a campaign's such sites: each of their weights is a
model input (fed the stored value unless it is the one faulted, one image and
fault per run), and each such activation goes through a Where node spliced in
after its producer (fed an empty mask unless it is the one faulted, so that a
batch of images carries a batch of faults). Either costs a forward pass per
fault, what a plain injector pays for every fault. The session is not the
model's own (a weight fed as an input is not prepacked or folded), so the
golden scores of these sites are its fault-free run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.fi.graphinfo import GraphInfo
from harden.fi.sites import Site, layer_node
from harden.graph.ort import make_session

_MASK, _VALUE = "__harden_mask_", "__harden_value_"


def needs_whole_model(info: GraphInfo, site: Site) -> bool:
    """Whether faults at `site` need the whole model: a folded activation, or a weight that is shared or whose
    layer reads or writes tensors without one slice per image. A layer input that is one value per run (a
    dynamically quantised layer's zero point) does not count where every run is one image: it is then that
    image's value, and the layer is rerun with it."""
    if site.kind == "activation":
        return info.tensors[site.tensor].fold > 0
    node = layer_node(info, site)
    layer = [t for t in (*node.input, node.output[0]) if t and t not in info.constants]
    whole_ok = info.run_batch == 1
    return site.shared or not all(info.per_image(t) or (whole_ok and t != node.output[0] and not info.image_rows(t))
                                  for t in layer)


class WholeModel:
    """The model with the whole-model sites' weights as inputs and a fault splice after each such activation."""

    def __init__(self, info: GraphInfo, sites: Sequence[Site], providers: Sequence[str], opt_level: str,
                 threads: int = 0) -> None:
        self.info = info
        self.weights = {s.tensor: info.constants[s.tensor] for s in sites if s.kind == "weight"}
        self.activations = [s.tensor for s in sites if s.kind == "activation"]
        model = onnx.ModelProto()
        model.CopyFrom(info.model)
        graph = model.graph
        kept_init = [t for t in graph.initializer if t.name not in self.weights]
        del graph.initializer[:]
        graph.initializer.extend(kept_init)
        nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in self.weights)]
        for tensor in self.activations:
            at = next(i for i, n in enumerate(nodes) if tensor in n.output)
            raw = tensor + "__harden_raw"
            nodes[at].output[list(nodes[at].output).index(tensor)] = raw
            nodes.insert(at + 1, helper.make_node("Where", [_MASK + tensor, _VALUE + tensor, raw], [tensor],
                                                  name="__harden_fault_" + tensor))
            dtype = helper.np_dtype_to_tensor_dtype(info.tensors[tensor].dtype)
            graph.input.extend([helper.make_tensor_value_info(_MASK + tensor, onnx.TensorProto.BOOL, None),
                                helper.make_tensor_value_info(_VALUE + tensor, dtype, None)])
        del graph.node[:]
        graph.node.extend(nodes)
        declared = {i.name for i in graph.input}  # models before IR 4 list every initializer as an input too
        graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(w.dtype),
                                                         list(w.shape))
                           for name, w in self.weights.items() if name not in declared)
        self.session = make_session(model, providers=providers, opt_level=opt_level, threads=threads,
                                    spinning=False)

    def _run(self, x: np.ndarray, weights: dict[str, np.ndarray], splice: dict[str, np.ndarray]) -> np.ndarray:
        """Scores of images x, with these weights changed and these (mask, value) splices; the rest golden."""
        feeds: dict[str, np.ndarray] = {self.info.input_name: x, **self.weights, **weights}
        for tensor in self.activations:
            mask, value = splice.get(tensor) or self._empty_splice(tensor, len(x))
            feeds[_MASK + tensor], feeds[_VALUE + tensor] = mask, value
        return self.session.run([self.info.scores], feeds)[0]

    def _empty_splice(self, tensor: str, images: int) -> tuple[np.ndarray, np.ndarray]:
        """A (mask, value) pair that changes nothing, for `images` images' images × k rows of `tensor`."""
        t = self.info.tensors[tensor]
        shape = (images * t.shape[0], *t.shape[1:])
        return np.zeros(shape, dtype=bool), np.zeros(shape, dtype=t.dtype)

    def golden(self, x: np.ndarray) -> np.ndarray:
        """The fault-free scores of this session: what its faults are compared with."""
        return self._run(x, {}, {})

    def weight_scores(self, name: str, x: np.ndarray, elems: np.ndarray, faulty: np.ndarray) -> np.ndarray:
        """Row i: the scores of image x[i] with element elems[i] of weight `name` set to faulty[i]."""
        out = np.empty((len(x), self.info.classes), dtype=self.info.tensors[self.info.scores].dtype)
        stored = self.weights[name]
        faulty = np.asarray(faulty, dtype=stored.dtype)  # as stored: a NaN keeps its payload bits
        for i, element in enumerate(elems.tolist()):
            w = stored.copy()
            w.flat[element] = faulty[i]
            out[i] = self._run(x[i:i + 1], {name: w}, {})[0]
        return out

    def activation_scores(self, tensor: str, x: np.ndarray, elems: np.ndarray, faulty: np.ndarray) -> np.ndarray:
        """Row i: the scores of image x[i] with element elems[i] of its slice of `tensor` set to faulty[i]."""
        mask, value = self._empty_splice(tensor, len(x))
        rows = np.arange(len(x))
        mask.reshape(len(x), -1)[rows, elems] = True
        value.reshape(len(x), -1)[rows, elems] = faulty
        return self._run(x, {}, {tensor: (mask, value)})
