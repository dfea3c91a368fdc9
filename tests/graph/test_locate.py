"""locate_classifier on every supported layout, and its refusals with reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.graph.locate import locate_classifier
from harden.graph.passes import random_inputs, run_exposed
from tests.graph.tiny_models import CHANNELS, CLASSES, KINDS, tiny_classifier

LINEAR_KINDS = [k for k in KINDS if k != "conv-relu-gap"]


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_weights_and_bias_reproduce_the_scores(kind: str, softmax: bool) -> None:
    model = tiny_classifier(kind, softmax)
    info = locate_classifier(model)
    assert info.output == ("probs" if softmax else "scores")
    assert info.num_classes == CLASSES
    assert info.in_features == (CHANNELS if kind == "conv1x1" else CHANNELS * 64)
    feats, scores = run_exposed(model, [info.features, info.scores], random_inputs(model, 3, seed=0))
    want = feats.reshape(3, -1) @ info.weight.T + info.bias
    np.testing.assert_allclose(scores.reshape(3, -1), want, rtol=1e-5, atol=1e-5)
    if kind == "matmul":
        assert not info.bias.any()


def test_gemm_alpha_beta_are_folded_into_weight_and_bias() -> None:
    model = tiny_classifier("gemm-transB0", False)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    info = locate_classifier(model)
    np.testing.assert_allclose(info.weight, 0.5 * weights["fc_w"].T)
    np.testing.assert_allclose(info.bias, 2.0 * weights["fc_b"])


def test_squeezenet_style_tail_is_supported_and_flagged_non_linear() -> None:
    info = locate_classifier(tiny_classifier("conv-relu-gap", True))
    assert info.kind == "conv1x1-relu-gap"
    assert not info.exact_linear and info.notes
    assert info.in_features == CHANNELS and info.features == "r1"


def test_several_outputs_need_a_choice() -> None:
    model = tiny_classifier("gemm-transB1", True, extra_output=True)
    with pytest.raises(HardenError, match="--output"):
        locate_classifier(model)
    assert locate_classifier(model, output="probs").kind == "gemm"
    with pytest.raises(HardenError, match="not an output"):
        locate_classifier(model, output="nope")


def _gemm_model(weight_as_input: bool = False, shared: bool = False, quantised: bool = False,
                qlinear: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])]
    inits = [numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    nodes = []
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 5]))
    elif quantised:
        inits += [numpy_helper.from_array(np.ones((3, 5), np.int8), "wq"),
                  numpy_helper.from_array(np.float32(0.1), "ws")]
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"]))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    if qlinear:
        inits = [numpy_helper.from_array(np.ones((5, 3), np.int8), "wq"),
                 numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("QLinearMatMul", ["xq", "s", "z", "wq", "s", "z", "s", "z"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y0"]),
                 helper.make_node("Softmax", ["y0"], ["y"])]
    else:
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1))
    if shared:
        nodes.append(helper.make_node("Identity", ["w"], ["w_copy"]))
        outputs.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [3, 5]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_refuses_weights_that_are_graph_inputs() -> None:
    with pytest.raises(HardenError, match="graph input"):
        locate_classifier(_gemm_model(weight_as_input=True))


def test_refuses_shared_weights() -> None:
    with pytest.raises(HardenError, match="shared"):
        locate_classifier(_gemm_model(shared=True), output="y")


def test_refuses_dequantized_weights() -> None:
    with pytest.raises(HardenError, match="quantised"):
        locate_classifier(_gemm_model(quantised=True))


def test_refuses_qlinear_classifier() -> None:
    with pytest.raises(HardenError, match="quantised"):
        locate_classifier(_gemm_model(qlinear=True))


def test_refuses_a_spatial_conv_and_an_unknown_producer() -> None:
    model = tiny_classifier("conv1x1", False)
    for node in model.graph.node:
        if node.op_type == "GlobalAveragePool":
            node.op_type = "Identity"  # the 1×1 Conv now sees an 8×8 map: per-pixel scores
    graph = model.graph
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    with pytest.raises(HardenError, match="1×1 map"):
        locate_classifier(model)
    relu_out = tiny_classifier("gemm-transB1", False)
    relu_out.graph.node.append(helper.make_node("Relu", ["scores"], ["relu_scores"]))
    del relu_out.graph.output[:]
    relu_out.graph.output.append(helper.make_tensor_value_info("relu_scores", TensorProto.FLOAT, None))
    with pytest.raises(HardenError, match="Relu"):
        locate_classifier(relu_out)


def test_refuses_weights_times_features_and_transposed_features() -> None:
    w = numpy_helper.from_array(np.ones((3, 5), np.float32), "w")
    matmul = helper.make_graph([helper.make_node("MatMul", ["w", "x"], ["y"])], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N"])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "N"])], initializer=[w])
    with pytest.raises(HardenError, match="W·x"):
        locate_classifier(helper.make_model(matmul, opset_imports=[helper.make_opsetid("", 17)]))
    model = _gemm_model()
    for node in model.graph.node:
        node.attribute.append(helper.make_attribute("transA", 1))
    with pytest.raises(HardenError, match="transA"):
        locate_classifier(model)


@pytest.mark.parametrize("bias", [True, False])
def test_a_dynamically_quantised_classifier_is_refused_as_quantised(tmp_path, bias: bool) -> None:  # type: ignore[no-untyped-def]
    """quantize_dynamic ends the classifier in Cast → Mul (its scale) → Add (its bias): the refusal names the
    MatMulInteger, where it used to say the Add 'does not add a bias to one MatMul'."""
    from onnxruntime.quantization import quantize_dynamic

    from tests.fi.tiny_models import linear_mlp

    onnx.save(linear_mlp(0, bias=bias), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"))
    with pytest.raises(HardenError, match="the classifier is quantised \\(MatMulInteger 'fc2_quant'\\)"):
        locate_classifier(onnx.load(tmp_path / "d.onnx"))
