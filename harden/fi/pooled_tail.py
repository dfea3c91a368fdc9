"""ONNX Runtime runs of a pooled classifier's tail, for the faults harden.fi.exact_pooled's closed forms leave
open: they rerun through the graph's own nodes (the Conv, any range clip, the ReLU, the pool), copied from it
with the constants they read, so that what decides them is what the deployed graph computes."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from harden.fi.exact_pooled import PooledConvHead


class TailRunner:
    """Sessions over a PooledConvHead's nodes, for a map of `map_shape` (H, W)."""

    def __init__(self, head: PooledConvHead, map_shape: Sequence[int], providers: Sequence[str]) -> None:
        self.h, self.map_shape, self.providers = head, tuple(map_shape), tuple(providers)
        self.classes, self.channels = head.weight.shape

    def scores(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The C pooled scores of one image's map `x` (d×P) with `weight` (C×d) and `bias` (C) fed in: a fed
        weight computes the same bits as a stored one (tests/fi/test_exact_pooled.py)."""
        feeds = {self.h.input: x.reshape(1, self.channels, *self.map_shape),
                 self.h.weight_name: weight.reshape(self.classes, self.channels, 1, 1)}
        if self.h.bias_name:
            feeds[self.h.bias_name] = bias
        return self._conv.run(None, feeds)[0].reshape(-1)

    def pooled(self, maps: np.ndarray) -> np.ndarray:
        """The pooled score of each row of `maps` (M×P), one Conv output channel each: the pool's sum over a
        channel does not depend on the other channels."""
        return self._pool.run(None, {self.h.output: maps.reshape(len(maps), 1, *self.map_shape)})[0].reshape(-1)

    @functools.cached_property
    def _conv(self) -> ort.InferenceSession:
        inputs = [helper.make_tensor_value_info(self.h.input, TensorProto.FLOAT, [1, self.channels, *self.map_shape]),
                  helper.make_tensor_value_info(self.h.weight_name, TensorProto.FLOAT,
                                                [self.classes, self.channels, 1, 1])]
        if self.h.bias_name:
            inputs.append(helper.make_tensor_value_info(self.h.bias_name, TensorProto.FLOAT, [self.classes]))
        return self._session(self.h.nodes, inputs)

    @functools.cached_property
    def _pool(self) -> ort.InferenceSession:
        return self._session(self.h.nodes[1:], [helper.make_tensor_value_info(self.h.output, TensorProto.FLOAT,
                                                                              ["M", 1, *self.map_shape])])

    def _session(self, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto]) -> ort.InferenceSession:
        from harden.graph.ort import make_session

        constants = [numpy_helper.from_array(np.asarray(v), k) for k, v in self.h.constants.items()]
        graph = helper.make_graph(nodes, "pooled-head", inputs,
                                  [helper.make_tensor_value_info(self.h.pooled, TensorProto.FLOAT, None)], constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.h.opset)])
        model.ir_version = 8
        return make_session(model, providers=self.providers, opt_level="disable", threads=1, spinning=False)
