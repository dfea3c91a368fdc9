"""The exact analysis of a QOperator graph's QGemm classifier against brute force: every fault of its weight,
bias, input and output run through ONNX Runtime's own QGemm and DequantizeLinear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact_integer import IntegerHead
from harden.fi.exact_onnx import analyse_model
from harden.graph.ort import expose, make_session
from tests.fi.test_qoperator import qoperator
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, stem_cnn


def _head_session(model: onnx.ModelProto, head: IntegerHead, input_dtype: np.dtype):  # type: ignore[no-untyped-def]
    """ONNX Runtime's QGemm and DequantizeLinear alone, the input, weight and bias fed per run: the top-1 of
    each image, and the stored weight and bias."""
    gemm = next(n for n in model.graph.node if n.name == head.node)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == gemm.output[0])
    consts = {t.name: t for t in model.graph.initializer}
    fed = (gemm.input[0], gemm.input[3], gemm.input[6])
    weight, bias = (numpy_helper.to_array(consts[t]) for t in fed[1:])
    inits = [consts[t] for t in (*gemm.input, *dq.input) if t in consts and t not in fed]
    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(d), None)
              for t, d in zip(fed, (input_dtype, weight.dtype, bias.dtype))]
    graph = helper.make_graph([gemm, dq], "head", inputs,
                              [helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None)], inits)
    copy = helper.make_model(graph, opset_imports=list(model.opset_import))
    copy.ir_version = model.ir_version
    session = make_session(copy, opt_level="disable")

    def top1(a: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.argmax(session.run(None, {fed[0]: a, fed[1]: w, fed[2]: b})[0], axis=1)

    return top1, weight, bias


def _flipped(values: np.ndarray, index: tuple, bit: int) -> np.ndarray:  # type: ignore[type-arg]
    """A copy of stored integers with `bit` flipped at `index`."""
    out = values.copy()
    out[index] = flip(np.atleast_1d(values[index]).reshape(-1), np.array([bit] * np.size(values[index])),
                      values.dtype.name).reshape(np.shape(values[index]))
    return out


def _brute(model: onnx.ModelProto, x: np.ndarray) -> dict[str, list[int]]:
    """SDC per bit of every site, each fault applied and run by ONNX Runtime."""
    head = IntegerHead(model)
    a, y = make_session(expose(model, [head.input, head.output]), opt_level="disable").run(
        [head.input, head.output], {model.graph.input[0].name: x})
    a, y = a.reshape(len(x), -1), y.reshape(len(x), -1)
    run, weight, bias = _head_session(model, head, a.dtype)
    top1 = run(a, weight, bias)
    out = {role: [0] * (8 * v.dtype.itemsize) for role, v in (("weight", weight), ("bias", bias), ("input", a),
                                                                ("output", y))}
    for bit in range(8 * weight.dtype.itemsize):
        for k in np.ndindex(weight.shape):
            out["weight"][bit] += int((run(a, _flipped(weight, k, bit), bias) != top1).sum())
    for bit in range(8 * bias.dtype.itemsize):
        for k in np.ndindex(bias.shape):
            out["bias"][bit] += int((run(a, weight, _flipped(bias, k, bit)) != top1).sum())
    for bit in range(8 * a.dtype.itemsize):
        for f in range(a.shape[1]):
            out["input"][bit] += int((run(_flipped(a, np.s_[:, f], bit), weight, bias) != top1).sum())
    for bit in range(8 * y.dtype.itemsize):
        for c in range(y.shape[1]):  # dequantising keeps the order of the stored scores
            out["output"][bit] += int((np.argmax(_flipped(y, np.s_[:, c], bit), axis=1) != top1).sum())
    return out


@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8], ids=["uint8", "int8"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_every_integer_fault_of_a_qgemm_head_matches_onnx_runtime(tmp_path: Path, activations: QuantType,
                                                                   per_channel: bool) -> None:
    """Each site's SDC count, bit by bit, equals brute force: including int32 bias flips that wrap the
    accumulator, and saturating outputs."""
    model = qoperator(stem_cnn(seed=3, classes=5), tmp_path, activations, per_channel)
    x, _ = labelled_inputs(stem_cnn(seed=3, classes=5), 24)
    result = analyse_model(model, x)
    want = _brute(model, x)
    assert {s.role: s.sdc for s in result.sites} == want
    assert result.total_sdc > 0 and all(sum(s.due) == 0 for s in result.sites)
    weight = result.site(IntegerHead(model).weight_name)
    assert weight.total_faults == 5 * 6 * 8 * len(x) and weight.fmt == "int8"
    assert result.site(IntegerHead(model).bias_name).fmt == "int32"


def test_what_the_integer_analysis_does_not_cover_is_refused_with_its_reason(tmp_path: Path) -> None:
    """A QLinearMatMul classifier (with its QLinearAdd bias), a range policy, and a QDQ graph."""
    from tests.fi.test_quantised import quantised

    x, _ = labelled_inputs(matmul_mlp(), 8)
    with pytest.raises(HardenError, match="the dequantised scores come from QLinearAdd"):
        analyse_model(qoperator(matmul_mlp(), tmp_path), x)
    model = qoperator(stem_cnn(), tmp_path)
    with pytest.raises(HardenError, match="policy 'range' clamps float values"):
        analyse_model(model, labelled_inputs(stem_cnn(), 8)[0], policy="range")
    with pytest.raises(HardenError, match="quantised in QDQ format"):
        analyse_model(quantised(stem_cnn(), tmp_path), labelled_inputs(stem_cnn(), 8)[0])
