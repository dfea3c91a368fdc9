"""ONNX Runtime sessions: weights shared between sessions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.graph.ort import SharedWeights, make_session


def _conv_matmul(w: np.ndarray, g: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node("Flatten", ["y"], ["f"]),
             helper.make_node("MatMul", ["f", "G"], ["z"])]
    graph = helper.make_graph(nodes, "conv_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 20])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_session_reads_shared_weights_in_place_with_the_same_bits() -> None:
    """Each session must read the one shared copy of a Conv's weight (else nothing is saved) and compute what
    it computes on its own copies, bit for bit. (A MatMul's may still be packed into a buffer of the session's
    own, depending on its shape: the same bits, and no saving for that tensor.)"""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    g = rng.standard_normal((16 * 6 * 6, 20)).astype(np.float32)
    model = _conv_matmul(w, g)
    x = rng.standard_normal((3, 16, 8, 8)).astype(np.float32)
    own = make_session(model, opt_level="disable").run(None, {"x": x})[0]
    shared = SharedWeights({"W": w, "G": g})
    assert set(shared.values) == {"W", "G"}
    session = make_session(model, opt_level="disable", shared=shared.values)
    out = session.run(None, {"x": x})[0]
    assert np.array_equal(out.view(np.uint32), own.view(np.uint32))
    saved = shared.arrays["W"].copy()
    shared.arrays["W"][:] = 0  # writing the shared array changes what the session computes: it holds no copy
    assert not np.array_equal(session.run(None, {"x": x})[0], out)
    shared.arrays["W"][:] = saved
    assert np.array_equal(session.run(None, {"x": x})[0], out)


def test_only_large_float_tensors_are_shared() -> None:
    n = SharedWeights.MIN_ELEMENTS
    shared = SharedWeights({"big": np.zeros(n, np.float32), "half": np.zeros(n, np.float16),
                            "small": np.zeros(3, np.float32), "int8": np.zeros(n, np.int8)})
    assert set(shared.values) == {"big", "half"}
