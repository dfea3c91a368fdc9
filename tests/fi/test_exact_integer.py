"""The exact analysis of a QOperator graph's QGemm classifier against brute force: every fault of its weight,
bias, input and output run through ONNX Runtime's own QGemm and DequantizeLinear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.integer_head import IntegerHead
from harden.fi.exact_onnx import analyse_model
from harden.graph.ort import expose, make_session
from tests.fi.test_qoperator import qoperator
from tests.fi.test_quantised import quantised
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, pointwise_cnn, saturating_head, scaled_mlp, stem_cnn


def _session(model: onnx.ModelProto, nodes: list[onnx.NodeProto], fed: list[str], dtypes: list[np.dtype]):  # type: ignore[no-untyped-def]
    """ONNX Runtime running `nodes` of the model alone, the tensors `fed` given per run: each image's top-1."""
    consts = {t.name: t for t in model.graph.initializer}
    inits = {t: consts[t] for n in nodes for t in n.input if t in consts and t not in fed}
    inputs = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(d), None) for t, d in zip(fed, dtypes)]
    graph = helper.make_graph(nodes, "head", inputs,
                              [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
                              list(inits.values()))
    copy = helper.make_model(graph, opset_imports=list(model.opset_import))
    copy.ir_version = model.ir_version
    session = make_session(copy, opt_level="disable")

    def top1(*values: np.ndarray | None) -> np.ndarray:
        return np.argmax(session.run(None, dict(zip(fed, values)))[0], axis=1)

    return top1


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
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight, bias = consts[head.weight_name], consts.get(head.bias_name)
    fed = [t for t in (head.input, head.weight_name, head.bias_name) if t]
    layer = next(n for n in model.graph.node if n.name == head.node)
    after = [*([head.pool] if head.pool is not None else []), *head.tail]
    run = _session(model, head.with_constant_producers([layer, *after]), fed,
                   [a.dtype, weight.dtype, *([bias.dtype] if bias is not None else [])])
    tail = _session(model, head.with_constant_producers(after), [head.output], [y.dtype])
    top1 = run(a, weight, bias)
    out = {role: [0] * (8 * v.dtype.itemsize) for role, v in (("weight", weight), ("bias", bias), ("input", a),
                                                                ("output", y)) if v is not None}
    out["weight hitting the top-1 class"] = [0] * (8 * weight.dtype.itemsize)
    for bit in range(8 * weight.dtype.itemsize):
        for k in np.ndindex(weight.shape):
            sdc = run(a, _flipped(weight, k, bit), bias) != top1
            out["weight"][bit] += int(sdc.sum())
            out["weight hitting the top-1 class"][bit] += int((sdc & (top1 == k[0 if head.transposed else 1])).sum())
    for bit in range(8 * bias.dtype.itemsize if bias is not None else 0):
        for k in np.ndindex(bias.shape):
            out["bias"][bit] += int((run(a, weight, _flipped(bias, k, bit)) != top1).sum())
    flat_a, flat_y = a.reshape(len(x), -1), y.reshape(len(x), -1)  # every element of an image, as stored
    for bit in range(8 * a.dtype.itemsize):
        for f in range(flat_a.shape[1]):
            faulty = _flipped(flat_a, np.s_[:, f], bit).reshape(a.shape)
            out["input"][bit] += int((run(faulty, weight, bias) != top1).sum())
    for bit in range(8 * y.dtype.itemsize):
        for c in range(flat_y.shape[1]):  # the layer's output, through ORT's nodes after it
            out["output"][bit] += int((tail(_flipped(flat_y, np.s_[:, c], bit).reshape(y.shape)) != top1).sum())
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
    weight = result.site(IntegerHead(model).weight_name)
    assert want.pop("weight hitting the top-1 class") == weight.hit_sdc
    assert {s.role: s.sdc for s in result.sites} == want
    assert result.total_sdc > 0 and all(sum(s.due) == 0 for s in result.sites)
    assert result.head == "integer linear (QGemm)"
    assert weight.total_faults == 5 * 6 * 8 * len(x) and weight.fmt == "int8"
    assert result.site(IntegerHead(model).bias_name).fmt == "int32"


@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8], ids=["uint8", "int8"])
def test_a_scaled_qlinearmatmul_head_as_the_text_head_ends_matches_onnx_runtime(tmp_path: Path,
                                                                                activations: QuantType) -> None:
    """QLinearMatMul (no bias) and a QLinearMul by a stored scale: the scale's requantisation, tabulated from
    ONNX Runtime per stored value, merges scores into ties that the first-index rule settles."""
    model = qoperator(scaled_mlp(seed=1), tmp_path, activations)
    x, _ = labelled_inputs(scaled_mlp(seed=1), 24)
    result = analyse_model(model, x)
    # its first MatMul feeds it alone: a projection (tests/fi/test_integer_projection.py)
    assert result.head == "integer linear (QLinearMatMul projection + QLinearMatMul + QLinearMul)"
    want = _brute(model, x)
    mine = [s for s in result.sites if not s.role.startswith("proj_")]
    assert want.pop("weight hitting the top-1 class") == mine[0].hit_sdc
    assert {s.role: s.sdc for s in mine} == want
    assert [s.role for s in mine] == ["weight", "input", "output"] and result.total_sdc > 0


@pytest.mark.parametrize("integer_softmax", [True, False], ids=["QLinearSoftmax", "float-Softmax"])
def test_a_head_ending_in_a_softmax_matches_onnx_runtime(tmp_path: Path, integer_softmax: bool) -> None:
    """A softmax mixes the classes: each row a single-class fault can make is run through ONNX Runtime's own
    tail, and input faults' rows as they come. Quantised into uint8 probabilities, many scores tie."""
    model = stem_cnn(seed=3, classes=5, softmax=True)
    x, _ = labelled_inputs(model, 24)
    if integer_softmax:
        quantised_model = qoperator(model, tmp_path, QuantType.QUInt8)
    else:  # the softmax left in float, after the DequantizeLinear
        quantised_model = quantised(model, tmp_path, activations=QuantType.QUInt8, fmt=QuantFormat.QOperator,
                                    op_types=["Conv", "Gemm", "MaxPool", "GlobalAveragePool"])
    head = IntegerHead(quantised_model)
    assert head.mixes and ("QLinearSoftmax" if integer_softmax else "Softmax") in {n.op_type for n in head.tail}
    result = analyse_model(quantised_model, x)
    assert result.head == f"integer linear (QGemm + {'QLinearSoftmax' if integer_softmax else 'Softmax'})"
    want = _brute(quantised_model, x)
    assert want.pop("weight hitting the top-1 class") == result.sites[0].hit_sdc
    assert {s.role: s.sdc for s in result.sites} == want and result.total_sdc > 0


@pytest.mark.parametrize("case", ["map-pooled", "map-pooled-softmax", "pooled-first"])
def test_a_1x1_qlinearconv_classifier_matches_onnx_runtime(tmp_path: Path, case: str) -> None:
    """The model zoo's SqueezeNet classifies each pixel of a 5×5 map (its ReLU folded into the requantisation)
    and pools the classes' maps with QLinearGlobalAveragePool: a weight or bias fault moves a whole map, an
    input or output fault one pixel of it, and the pool reads the sum. DenseNet-121 pools first: a 1×1 map,
    a Gemm in all but layout."""
    float_model = pointwise_cnn(seed=2, pool_first=case == "pooled-first", softmax=case.endswith("softmax"))
    model = qoperator(float_model, tmp_path)
    x, _ = labelled_inputs(float_model, 16)
    head = IntegerHead(model)
    assert head.op == "QLinearConv" and (head.pool is None) == (case == "pooled-first")
    result = analyse_model(model, x)
    want = _brute(model, x)
    by_role = {s.role: s for s in result.sites}
    assert want.pop("weight hitting the top-1 class") == by_role["weight"].hit_sdc
    assert {role: s.sdc for role, s in by_role.items()} == want and result.total_sdc > 0
    pixels = 1 if case == "pooled-first" else 25
    assert by_role["input"].elements == 6 * pixels and by_role["output"].elements == 5 * pixels
    assert result.head == "integer linear (QLinearConv" + ("" if case == "pooled-first" else " + QLinearGlobalAveragePool") \
        + (" + QLinearSoftmax)" if case.endswith("softmax") else ")")


def test_a_convolution_classifier_that_is_not_a_pooled_1x1_one_is_refused(tmp_path: Path) -> None:
    """A 3×3 classifier mixes neighbouring pixels, and a 1×1 one with no pool scores every pixel."""
    wide = pointwise_cnn(seed=2)
    conv = next(n for n in wide.graph.node if n.name == "classifier")
    del conv.attribute[:]
    conv.attribute.extend([helper.make_attribute("kernel_shape", [3, 3]), helper.make_attribute("pads", [1] * 4)])
    weight = next(t for t in wide.graph.initializer if t.name == "wc")
    weight.CopyFrom(numpy_helper.from_array(np.full((5, 6, 3, 3), 0.1, np.float32), "wc"))
    x, _ = labelled_inputs(pointwise_cnn(seed=2), 8)
    with pytest.raises(HardenError, match="is not an unpadded, ungrouped 1×1 convolution of stride 1"):
        analyse_model(qoperator(wide, tmp_path), x)
    unpooled = pointwise_cnn(seed=2)
    nodes = [n for n in unpooled.graph.node if n.op_type not in ("GlobalAveragePool", "Flatten")]
    nodes[-1].output[0] = "logits"  # the classifier's ReLU writes the 5-class map
    graph = helper.make_graph(nodes, "unpooled", list(unpooled.graph.input), [helper.make_tensor_value_info(
        "logits", onnx.TensorProto.FLOAT, ["N", 5, 5, 5])], list(unpooled.graph.initializer))
    model = helper.make_model(graph, opset_imports=list(unpooled.opset_import))
    with pytest.raises(HardenError, match="classifies each of 25 pixels, and no QLinearGlobalAveragePool follows"):
        analyse_model(qoperator(model, tmp_path), x)


def test_what_the_integer_analysis_does_not_cover_is_refused_with_its_reason(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A weight quantised at run time (a Constant node), a range policy, and a softmax tail whose table would
    take too long."""
    from harden.fi import integer_judges

    monkeypatch.setattr(integer_judges, "ROW_BUDGET", 10 * 5 * 256 * 5)  # 10 images of 5 classes
    softmax = stem_cnn(seed=3, classes=5, softmax=True)
    with pytest.raises(HardenError, match="needs 15,360 rows run through ONNX Runtime for 12 images; it allows 10 images"):
        analyse_model(qoperator(softmax, tmp_path), labelled_inputs(softmax, 12)[0])
    x, _ = labelled_inputs(matmul_mlp(), 8)
    with pytest.raises(HardenError, match="needs a constant weight"):
        analyse_model(qoperator(matmul_mlp(), tmp_path), x)
    model = qoperator(stem_cnn(), tmp_path)
    with pytest.raises(HardenError, match="policy 'range' clamps float values"):
        analyse_model(model, labelled_inputs(stem_cnn(), 8)[0], policy="range")


def test_the_bisected_weight_intervals_give_the_requantised_counts(tmp_path: Path) -> None:
    """The fast weight path (an interval of harmless accumulator moves per image and class, bisected) against
    requantising every faulty accumulator, on a head with 24 classes."""
    from harden.fi.exact_integer import _keep_interval, _weight
    from harden.fi.integer_judges import golden_state

    model = qoperator(stem_cnn(seed=4, classes=24), tmp_path)
    head = IntegerHead(model)
    g = golden_state(head, labelled_inputs(stem_cnn(seed=4, classes=24), 32)[0])
    fast = _weight(head, g.x, g.acc, g.judge)
    assert fast.total_sdc > 0 and fast == _weight(head, g.x, g.acc, g.judge, bisect=False)
    # the intervals are tight: their ends keep the top-1, one step past them does not
    acc = g.acc[:, :, 0]  # one pixel
    lo, hi = _keep_interval(head, acc, g.judge)
    rows, classes = np.indices(acc.shape).reshape(2, -1)
    own = (classes == g.top1[rows]).reshape(acc.shape)

    def sdc(a: np.ndarray) -> np.ndarray:
        return g.judge.sdc(rows, classes, head.requantise(a[:, :, None]).reshape(-1)).reshape(a.shape)

    end = np.where(own, acc + lo, acc + hi)
    past = np.where(own, end - 1, end + 1)
    inside = (past >= -(2**31)) & (past < 2**31)  # an end at the int32 limit has nothing past it
    assert not sdc(np.clip(end, -(2**31), 2**31 - 1)).any()
    assert sdc(np.where(inside, past, acc))[inside].all() and inside.sum() > 0.9 * inside.size


def test_an_integer_classifier_whose_pairs_saturate_matches_onnx_runtime(tmp_path: Path) -> None:
    """uint8 inputs near 255 against int8 weights near ±127: on a CPU whose kernel saturates in int16 pairs
    (AVX2 without VNNI), the golden accumulators and every weight and input fault's move saturate as ONNX
    Runtime's do; elsewhere the same model checks the exact sum."""
    model = qoperator(saturating_head(), tmp_path, QuantType.QUInt8)
    x = np.random.default_rng(3).uniform(0.85, 1.0, size=(12, 8)).astype(np.float32)
    head = IntegerHead(model)
    result = analyse_model(model, x)
    want = _brute(model, x)
    want.pop("weight hitting the top-1 class")
    assert {s.role: s.sdc for s in result.sites} == want
    assert result.site(head.weight_name).total_sdc > 0 and result.site(head.input).total_sdc > 0
    assert ("saturating" in result.fmt) == head.kernel.saturates
