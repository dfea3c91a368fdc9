"""Which graphs couple their batch rows, and so run one image at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import quantize_dynamic

from harden.errors import HardenError
from harden.graph.batching import RowRunner, images_per_run, replicate, row_coupling
from harden.graph.parallel import run_model
from tests.fi.tiny_models import residual_cnn, scaled_mlp


def test_a_float_graph_batches_and_a_dynamically_quantised_one_does_not(tmp_path: Path) -> None:
    onnx.save(scaled_mlp(), tmp_path / "mlp.onnx")
    quantize_dynamic(str(tmp_path / "mlp.onnx"), str(tmp_path / "dynamic.onnx"))
    dynamic = onnx.load(tmp_path / "dynamic.onnx")
    assert row_coupling(residual_cnn()) is None and images_per_run(residual_cnn(), 64) == 64
    assert row_coupling(dynamic) == "2 DynamicQuantizeLinear" and images_per_run(dynamic, 64) == 1
    # the reason it matters: batched, an image's scores depend on its batch mates
    x = np.random.default_rng(0).standard_normal((6, 1, 4, 4)).astype(np.float32)
    x[0] *= 50  # one image with a wide range coarsens the others' shared scale
    session = ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])
    batched = session.run(None, {"x": x})[0]
    alone = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert not np.array_equal(batched[1:], alone[1:])
    assert np.array_equal(run_model(dynamic, x, ["logits"], "disable", batch=4)[0], alone)


def test_batch_normalisation_in_training_mode_couples_rows() -> None:
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], training_mode=1)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph)
    assert row_coupling(model) == "1 BatchNormalization in training mode"
    model.graph.node[0].attribute[0].i = 0
    assert row_coupling(model) is None


def test_replicated_copies_give_each_image_the_bits_of_its_run_alone(tmp_path: Path) -> None:
    """RowRunner carries many images of a graph whose rows are coupled per ORT call, each in a copy of the graph
    of its own: the same scores as one call per image, bit for bit, also for a last call it cannot fill."""
    onnx.save(residual_cnn(), tmp_path / "cnn.onnx")
    quantize_dynamic(str(tmp_path / "cnn.onnx"), str(tmp_path / "dynamic.onnx"), op_types_to_quantize=["Conv"])
    dynamic = onnx.load(tmp_path / "dynamic.onnx")
    x = np.random.default_rng(2).standard_normal((11, 3, 8, 8)).astype(np.float32)
    x[3] *= 40  # batched, this image would coarsen the others' scale
    session = ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])
    alone = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    assert not np.array_equal(session.run(None, {"x": x})[0], alone)
    for copies in (1, 4, 16):
        (got,) = RowRunner(dynamic, copies=copies).run({"x": x})
        assert got.view(np.uint32).tolist() == alone.view(np.uint32).tolist(), copies
    doubled = replicate(dynamic, 2)
    onnx.checker.check_model(doubled)
    assert [v.name for v in doubled.graph.input] == ["x@0", "x@1"]
    assert len(doubled.graph.node) == 2 * len(dynamic.graph.node)
    assert len(doubled.graph.initializer) == len(dynamic.graph.initializer)  # the weights are shared


def test_a_graph_with_subgraphs_is_refused_with_its_reason() -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    node = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "if", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])])
    with pytest.raises(HardenError, match="subgraphs"):
        replicate(helper.make_model(graph), 2)
