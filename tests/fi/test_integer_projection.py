"""The exact analysis of the integer projection before a classifier (the text head's z = P·f + b) against
brute force: every fault of its weight, bias, input and output run through ONNX Runtime's own nodes, from the
projection to the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantType

from harden.errors import HardenError
from harden.fi.exact_onnx import analyse_model
from harden.fi.graphinfo import GraphInfo
from harden.fi.integer_head import IntegerHead
from harden.fi.integer_projection import find_projection
from harden.fi.qdq_deployed import fused_graph
from harden.fi.sites import list_sites
from harden.graph.ort import expose, make_session
from tests.fi.test_exact_integer import _flipped, _session
from tests.fi.test_qdq_deployed import _deployed_brute
from tests.fi.test_qoperator import qoperator
from tests.fi.test_quantised import quantised
from tests.fi.tiny_models import labelled_inputs, pointwise_cnn, stem_cnn, text_head_mlp


def _brute(model: onnx.ModelProto, x: np.ndarray) -> dict[str, list[int]]:
    """SDC per bit of the projection's sites, each fault applied alone and run by ONNX Runtime through the
    graph's nodes from the projection's stored tensors to the scores."""
    head = IntegerHead(model)
    projection = find_projection(head)
    assert projection is not None
    p = projection
    a, z = make_session(expose(model, [p.input, p.output]), opt_level="disable").run(
        [p.input, p.output], {model.graph.input[0].name: x})
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight, bias = consts[p.weight_name], consts[p.bias_name]
    run = _session(head.model, [*p.nodes, *p.rest], [p.input, p.weight_name, p.bias_name],
                   [a.dtype, weight.dtype, bias.dtype])
    rest = _session(head.model, p.rest, [p.output], [z.dtype])
    top1 = run(a, weight, bias)
    out = {role: [0] * (8 * v.dtype.itemsize) for role, v in (("proj_weight", weight), ("proj_bias", bias),
                                                                ("proj_input", a), ("proj_output", z))}
    for bit in range(8 * weight.dtype.itemsize):
        for k in np.ndindex(weight.shape):
            out["proj_weight"][bit] += int((run(a, _flipped(weight, k, bit), bias) != top1).sum())
    for bit in range(8 * bias.dtype.itemsize):
        for k in np.ndindex(bias.shape):
            out["proj_bias"][bit] += int((run(a, weight, _flipped(bias, k, bit)) != top1).sum())
    for bit in range(8 * a.dtype.itemsize):
        for f in range(a.shape[1]):
            out["proj_input"][bit] += int((run(_flipped(a, np.s_[:, f], bit), weight, bias) != top1).sum())
    for bit in range(8 * z.dtype.itemsize):
        for e in range(z.shape[1]):
            out["proj_output"][bit] += int((rest(_flipped(z, np.s_[:, e], bit)) != top1).sum())
    return out


@pytest.mark.parametrize("fmt", ["QOperator-uint8", "QOperator-int8", "QDQ-uint8", "QDQ-int8"])
def test_every_fault_of_the_text_head_s_projection_matches_onnx_runtime(tmp_path: Path, fmt: str) -> None:
    """The projection's stored output is dequantised, L2-normalised in float and requantised before the
    classifier: each fault's row runs through ORT's own nodes, and the counts equal brute force bit by bit. In
    a QDQ graph the kernels are those ORT fuses (with int8 activations it leaves the projection a float Gemm
    between DequantizeLinear and QuantizeLinear), the sites carry the QDQ graph's (the campaign's) names, and
    bias faults written into the QDQ graph and run as deployed give the same counts."""
    float_model = text_head_mlp(seed=1)
    activations = QuantType.QInt8 if fmt.endswith("-int8") else QuantType.QUInt8
    model = qoperator(float_model, tmp_path, activations) if fmt.startswith("QOperator") else quantised(
        float_model, tmp_path, activations=activations)
    x, _ = labelled_inputs(float_model, 24)
    result = analyse_model(model, x)
    projection = "Gemm" if fmt == "QDQ-int8" else "QGemm"
    assert result.head.startswith(f"integer linear ({projection} projection + QLinearMatMul + ")
    assert [s.role for s in result.sites] == ["proj_weight", "proj_bias", "proj_input", "proj_output", "weight",
                                              "input", "output"]
    reference = fused_graph(model, ("CPUExecutionProvider",)) if fmt.startswith("QDQ") else model
    got = {s.role: s.sdc for s in result.sites if s.role.startswith("proj_")}
    assert got == _brute(reference, x) and sum(map(sum, got.values())) > 0
    if fmt.startswith("QDQ"):
        campaign = {s.name for s in list_sites(GraphInfo(model))}
        assert {s.tensor for s in result.sites if s.role in ("proj_weight", "proj_bias", "proj_output")} <= campaign
        bias = next(s for s in analyse_model(model, x[:8]).sites if s.role == "proj_bias")
        assert bias.sdc == _deployed_brute(model, x[:8], bias.tensor)


def test_a_classifier_after_a_convolution_has_no_projection(tmp_path: Path) -> None:
    """Only a QGemm or QLinearMatMul whose output alone reaches the classifier is a projection: not a
    convolution's, through a global pool, nor one read directly by a 1×1 convolution classifier."""
    for model in (stem_cnn(), pointwise_cnn(pool_first=True)):
        assert find_projection(IntegerHead(qoperator(model, tmp_path))) is None


def test_a_projection_table_too_large_is_refused_with_the_images_it_allows(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from harden.fi import integer_projection

    monkeypatch.setattr(integer_projection, "TABLE_CELLS", 10 * 6 * 256)  # 10 images of 6 components
    float_model = text_head_mlp(seed=1)
    with pytest.raises(HardenError, match="has 18,432 rows .* for 12 images; the analysis allows 10 images"):
        analyse_model(qoperator(float_model, tmp_path), labelled_inputs(float_model, 12)[0])


def test_a_projection_whose_rows_would_take_too_long_is_refused(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from harden.fi import integer_projection

    monkeypatch.setattr(integer_projection, "ROW_BUDGET", 1000)
    float_model = text_head_mlp(seed=1)
    with pytest.raises(HardenError, match=r"needs [\d,]+ rows run for 12 images .*; it allows "
                                          "about 1 images"):
        analyse_model(qoperator(float_model, tmp_path), labelled_inputs(float_model, 12)[0])


@pytest.mark.parametrize("fmt", ["QOperator", "QDQ-int8"])
def test_the_sparse_update_of_many_classes_gives_the_same_counts(tmp_path: Path, monkeypatch, fmt: str) -> None:  # type: ignore[no-untyped-def]
    """Past DENSE_CLASSES, ORT computes only ẑ and the classifier's accumulators move by the changed components
    alone: every count equals the whole rows' run through ORT (and brute force)."""
    from harden.fi import integer_projection

    float_model = text_head_mlp(seed=2, classes=7)
    model = qoperator(float_model, tmp_path) if fmt == "QOperator" else quantised(float_model, tmp_path)
    x, _ = labelled_inputs(float_model, 24)
    whole = analyse_model(model, x)
    monkeypatch.setattr(integer_projection, "DENSE_CLASSES", 0)
    sparse = analyse_model(model, x)
    assert [(s.role, s.sdc) for s in sparse.sites] == [(s.role, s.sdc) for s in whole.sites]
    assert sum(s.total_sdc for s in sparse.sites if s.role.startswith("proj_")) > 0
