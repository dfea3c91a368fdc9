"""The exact analysis of a QDQ graph's classifier: the integer kernel ONNX Runtime fuses it into, checked
against brute force through that kernel's own nodes, and weight and bias faults against the QDQ graph itself
as ONNX Runtime deploys it (level `all`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic

from harden.errors import HardenError
from harden.fi.exact_onnx import analyse_model
from harden.fi.graphinfo import GraphInfo
from harden.fi.qdq_deployed import _check_deployed, fused_classifier, fused_graph
from harden.fi.sites import list_sites
from harden.graph.ort import make_session
from tests.fi.test_exact_integer import _brute, _flipped
from tests.fi.test_quantised import quantised
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, pointwise_cnn, scaled_mlp, stem_cnn

CPU = ("CPUExecutionProvider",)


def _deployed_brute(model: onnx.ModelProto, x: np.ndarray, name: str) -> list[int]:
    """SDC per bit of the stored initializer `name`, each fault written into the QDQ graph and run by ONNX
    Runtime at its default level, as deployed."""
    def top1(m: onnx.ModelProto) -> np.ndarray:
        session = make_session(m, opt_level="all", threads=1)
        return np.argmax(session.run(None, {m.graph.input[0].name: x})[0].reshape(len(x), -1), axis=1)

    golden = top1(model)
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
    stored = numpy_helper.to_array(model.graph.initializer[index])
    counts = [0] * (8 * stored.dtype.itemsize)
    for bit in range(len(counts)):
        for k in np.ndindex(stored.shape):
            faulty = onnx.ModelProto()
            faulty.CopyFrom(model)
            faulty.graph.initializer[index].CopyFrom(numpy_helper.from_array(_flipped(stored, k, bit), name))
            counts[bit] += int((top1(faulty) != golden).sum())
    return counts


@pytest.mark.parametrize("case", ["gemm-uint8", "gemm-int8-per-channel", "softmax-uint8", "scaled-int8",
                                  "pointwise-uint8"])
def test_every_fault_of_a_qdq_classifier_matches_onnx_runtime_as_deployed(tmp_path: Path, case: str) -> None:
    """Bit by bit, each site's SDC count equals brute force through the fused graph's own nodes; the bias's
    equals faults written into the QDQ graph and run as deployed. Sites carry the QDQ graph's names, which
    are the sampled campaign's. `scaled-int8`: ONNX Runtime leaves the text head's scale a float Mul between
    a DequantizeLinear and a QuantizeLinear; its table comes from those nodes. `pointwise`: a 1×1 Conv over a
    map, pooled (SqueezeNet's classifier), fused into QLinearConv and QLinearGlobalAveragePool."""
    float_model = scaled_mlp(seed=1) if case.startswith("scaled") else pointwise_cnn(seed=2) \
        if case.startswith("pointwise") else stem_cnn(seed=3, classes=5, softmax=case.startswith("softmax"))
    model = quantised(float_model, tmp_path, per_channel="per-channel" in case,
                      activations=QuantType.QInt8 if "-int8" in case else QuantType.QUInt8)
    x, _ = labelled_inputs(float_model, 24)
    result = analyse_model(model, x)
    fused = fused_classifier(model, x, providers=CPU)
    assert fused is not None and "fused from QDQ by ONNX Runtime" in result.head
    want = _brute(fused.model, x)
    by_role = {s.role: s for s in result.sites if not s.role.startswith("proj_")}  # the projection: its own test
    assert want.pop("weight hitting the top-1 class") == by_role["weight"].hit_sdc
    assert {role: s.sdc for role, s in by_role.items()} == want and result.total_sdc > 0
    campaign_sites = {s.name for s in list_sites(GraphInfo(model))}
    assert {by_role[r].tensor for r in by_role if r != "input"} <= campaign_sites
    activations = "int8" if "-int8" in case else "uint8"
    assert (by_role["input"].fmt, by_role["output"].fmt, by_role["weight"].fmt) == (activations, activations, "int8")
    if "bias" in by_role:  # on 8 images: each fault is a session of the whole graph
        small = analyse_model(model, x[:8])
        bias = next(s for s in small.sites if s.role == "bias")
        assert bias.sdc == _deployed_brute(model, x[:8], bias.tensor) and bias.total_sdc > 0


def test_weight_faults_written_into_the_qdq_graph_give_the_analysed_counts(tmp_path: Path) -> None:
    """Every weight fault of a small head, run through the whole QDQ graph at ONNX Runtime's default level."""
    float_model = stem_cnn(seed=3, classes=3)
    model = quantised(float_model, tmp_path, activations=QuantType.QUInt8)
    x, _ = labelled_inputs(float_model, 8)
    weight = next(s for s in analyse_model(model, x).sites if s.role == "weight")
    assert weight.sdc == _deployed_brute(model, x, weight.tensor) and weight.total_sdc > 0


def test_a_classifier_left_out_of_quantisation_gets_the_float32_analysis(tmp_path: Path) -> None:
    """Users often keep the last layer in float; ONNX Runtime then has no integer kernel for it, and the float32
    analysis takes the classifier as stored."""
    float_model = stem_cnn(seed=3, classes=5)
    model = quantised(float_model, tmp_path, op_types=["Conv"])
    x, _ = labelled_inputs(float_model, 16)
    assert fused_classifier(model, x, providers=CPU) is None
    result = analyse_model(model, x)
    assert result.head == "linear" and {s.fmt for s in result.sites} == {"fp32"} and result.total_sdc > 0
    assert {s.tensor for s in result.sites} == {"wf", "bf", "flat", "logits"}


def test_what_the_qdq_analysis_cannot_judge_is_refused_with_its_reason(tmp_path: Path) -> None:
    """A range policy (it clamps floats) and a fused graph that does not give the deployed scores are refused; a
    classifier quantised dynamically (MatMulInteger, its input quantised at run time) has its own analysis
    (tests/fi/test_exact_dynamic.py)."""
    float_model = stem_cnn(seed=3, classes=5)
    model = quantised(float_model, tmp_path)
    x, _ = labelled_inputs(float_model, 8)
    with pytest.raises(HardenError, match="policy 'range' clamps float values, and ONNX Runtime runs this QDQ"):
        analyse_model(model, x, policy="range")
    tampered = fused_graph(model, CPU)
    scale = next(t for t in tampered.graph.initializer if t.name == "logits_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.001), scale.name))
    _check_deployed(model, fused_graph(model, CPU), x, 8, CPU, 1)
    with pytest.raises(HardenError, match="does not give the deployed scores on 8 of 8 images"):
        _check_deployed(model, tampered, x, 8, CPU, 1)
    onnx.save(scaled_mlp(), tmp_path / "mlp.onnx")
    quantize_dynamic(str(tmp_path / "mlp.onnx"), str(tmp_path / "dynamic.onnx"))
    result = analyse_model(onnx.load(tmp_path / "dynamic.onnx"), labelled_inputs(scaled_mlp(), 4)[0])
    assert result.head.startswith("dynamic integer linear")
    # its classifier's weight a Constant node, quantize_dynamic leaves it in float: analysed as stored
    onnx.save(matmul_mlp(), tmp_path / "mlp.onnx")
    quantize_dynamic(str(tmp_path / "mlp.onnx"), str(tmp_path / "dynamic.onnx"))
    dynamic = onnx.load(tmp_path / "dynamic.onnx")
    assert any(n.op_type == "MatMulInteger" for n in dynamic.graph.node)
    assert analyse_model(dynamic, labelled_inputs(matmul_mlp(), 8)[0]).head == "linear"


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_a_classifier_left_out_of_quantisation_gets_the_float32_analysis_in_either_format(tmp_path: Path,
                                                                                          fmt: str) -> None:
    """The convolutions quantised, the Gemm left in float (as users often keep the last layer): the same
    float32 analysis in both formats, of the classifier as stored."""
    float_model = stem_cnn(seed=3, classes=5)
    model = quantised(float_model, tmp_path, op_types=["Conv"], fmt=getattr(QuantFormat, fmt))
    assert any(n.op_type == "QLinearConv" for n in model.graph.node) == (fmt == "QOperator")
    result = analyse_model(model, labelled_inputs(float_model, 16)[0])
    assert result.head == "linear" and {s.fmt for s in result.sites} == {"fp32"} and result.total_sdc > 0


def test_a_fused_graph_that_rounds_differently_at_level_extended_is_taken_at_level_all(tmp_path: Path,
                                                                                      monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Where the graph ORT saves at level `extended` does not give the deployed scores (its float layers can
    round differently from `all`'s, as the architecture sweep's DenseNet-121 does), the one saved at `all` is
    analysed; where neither does, the analysis is refused with the reason."""
    from harden.fi import qdq_deployed

    float_model = stem_cnn(seed=3, classes=5)
    model = quantised(float_model, tmp_path)
    x, _ = labelled_inputs(float_model, 8)
    real = qdq_deployed.fused_graph

    def tampered(model: onnx.ModelProto, providers: Sequence[str], level: str = "extended") -> onnx.ModelProto:
        graph = real(model, providers, level)
        if level in broken:
            scale = next(t for t in graph.graph.initializer if t.name == "logits_scale")
            scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.001), scale.name))
        graph.doc_string = level
        return graph

    monkeypatch.setattr(qdq_deployed, "fused_graph", tampered)
    broken = {"extended"}
    fused = qdq_deployed.fused_classifier(model, x, providers=CPU)
    assert fused is not None and fused.model.doc_string == "all"
    broken = {"extended", "all"}
    with pytest.raises(HardenError, match="does not give the deployed scores on 8 of 8 images"):
        analyse_model(model, x)
