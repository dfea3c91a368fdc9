"""The range-clip pass: the injector's bounds, its clamp semantics, and an unchanged fault-free model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from harden.data import load_dataset
from harden.errors import HardenError
from harden.fi.profile import clamp_to_range, profile_ranges
from harden.graph.onnx_io import get_metadata
from harden.graph.ort import make_session
from harden.graph.passes import run_exposed
from harden.graph.range_clip import RangeClipPass, default_layers, resolve_layers
from tests.graph.tiny_models import tiny_classifier


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return load_dataset("digits:train", limit=128).images


def test_bounds_are_the_injectors_and_outputs_are_unchanged(calibration: np.ndarray) -> None:
    model = tiny_classifier("gemm-transB1", True)
    before = model.SerializeToString()
    clip_pass = RangeClipPass(calibration, calibration_spec="digits:train@128")
    out = clip_pass.run(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out, full_check=True)
    assert default_layers(model) == ["c1", "scores"]
    assert clip_pass.ranges == profile_ranges(model, calibration, ["c1", "scores"])
    assert clip_pass.parity_max_abs == 0.0
    assert [o.name for o in out.graph.output] == ["probs"]
    assert sum(n.op_type == "Clip" for n in out.graph.node) == 2
    config = json.loads(get_metadata(out)["harden.config"])
    assert config["ranges"] == pytest.approx(clip_pass.ranges)


def test_out_of_range_values_are_clamped_like_clamp_to_range(calibration: np.ndarray) -> None:
    model = tiny_classifier("gemm-transB1", False)
    clip_pass = RangeClipPass(calibration, layers=["stem"])  # a node name resolves to its output c1
    out = clip_pass.run(model)
    peak = clip_pass.ranges["c1"]
    # Feed values the calibration never saw; the consumers of c1 must see clamp_to_range(c1, peak).
    loud = (calibration[:4] * 50.0).astype(np.float32)
    loud[0, 0, 0, 0] = np.nan
    loud[1, 0, 0, 0] = np.inf
    raw_c1, = run_exposed(model, ["c1"], {"x": loud})
    clipped_relu, = run_exposed(out, ["r1"], {"x": loud})
    np.testing.assert_array_equal(clipped_relu, np.maximum(clamp_to_range(raw_c1, peak), 0))
    assert np.isfinite(clipped_relu).all()
    original = make_session(model).run(None, {"x": loud})[0]
    hardened = make_session(out).run(None, {"x": loud})[0]
    assert not np.allclose(original[2:], hardened[2:]), "the clip had no effect on out-of-range inputs"


def test_clipping_a_graph_output_keeps_its_name(calibration: np.ndarray) -> None:
    model = tiny_classifier("matmul-add", False)
    clip_pass = RangeClipPass(calibration, layers=["scores"])
    out = clip_pass.run(model)
    assert [o.name for o in out.graph.output] == ["scores"]
    loud = calibration[:2] * 100
    (got,) = make_session(out).run(None, {"x": loud})
    (raw,) = make_session(model).run(None, {"x": loud})
    np.testing.assert_array_equal(got, clamp_to_range(raw, clip_pass.ranges["scores"]))


def test_opset_9_uses_clip_attributes(calibration: np.ndarray) -> None:
    model = tiny_classifier("gemm-transB1", True, opset=9)
    out = RangeClipPass(calibration[:16]).run(model)
    clips = [n for n in out.graph.node if n.op_type == "Clip"]
    assert clips and all(len(n.input) == 1 and {a.name for a in n.attribute} == {"min", "max"} for n in clips)


def test_refusals(calibration: np.ndarray) -> None:
    model = tiny_classifier("gemm-transB1", True)
    with pytest.raises(HardenError, match="neither a node nor a tensor"):
        resolve_layers(model, ["missing"])
    assert "calibration" in (RangeClipPass(calibration[:0]).check(model) or "")
    with pytest.raises(HardenError):
        RangeClipPass(calibration, layers=["missing"]).run(model)


def test_a_qoperator_graph_is_refused_with_its_reason(calibration: np.ndarray, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its layers write integers: the refusal said it had 'no Conv, ConvTranspose, Gemm or MatMul node'."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = tiny_classifier("gemm-transB1", True)
    onnx.save(model, tmp_path / "f.onnx")
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{name: calibration[:32].astype(np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QOperator)
    reason = RangeClipPass(calibration).check(onnx.load(tmp_path / "q.onnx")) or ""
    assert "quantised in QOperator format (QGemm, QLinearConv)" in reason and "range-clip the float model" in reason


def test_a_second_run_gets_fresh_names(calibration: np.ndarray) -> None:
    model = tiny_classifier("gemm-transB1", True)
    once = RangeClipPass(calibration[:32]).run(model)
    twice = RangeClipPass(calibration[:32], layers=["c1"]).run(once)
    onnx.checker.check_model(twice, full_check=True)
    assert sum(n.op_type == "Clip" for n in twice.graph.node) == 3
    assert len(json.loads(get_metadata(twice)["harden.passes"])) == 2


@pytest.mark.parametrize("level", ["basic", "all"])
def test_ort_folds_a_clip_of_a_stored_weight_away(tmp_path, level: str) -> None:  # type: ignore[no-untyped-def]
    """Why the pass clips activations and not weights: ONNX Runtime computes a Clip of a stored weight once,
    when it loads the model, so a flip in the weight the session then holds would pass unclipped. (The
    README says so; if a runtime stops folding, that sentence must change.)"""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(value, name) for value, name in (
        (np.ones((3, 4), np.float32), "w"), (np.array(-1, np.float32), "lo"), (np.array(1, np.float32), "hi"),
        (np.array([0], np.float32), "zero"))]
    nodes = [helper.make_node("IsNaN", ["w"], ["nan"]), helper.make_node("Where", ["nan", "zero", "w"], ["w0"]),
             helper.make_node("Clip", ["w0", "lo", "hi"], ["wc"]),
             helper.make_node("Gemm", ["x", "wc"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    options = ort.SessionOptions()
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "Clip" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}


def test_a_dynamically_quantised_graph_is_clipped_at_the_injectors_sites(calibration: np.ndarray, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Its layers write int32, rescaled to float by Cast, Mul and the bias Add: the clip goes on that float tensor,
    which is the injector's activation site, and the layers used to be refused as 'no Conv...'."""
    from onnxruntime.quantization import quantize_dynamic

    from harden.fi.graphinfo import GraphInfo
    from harden.fi.sites import list_sites

    onnx.save(tiny_classifier("gemm-transB1", True), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), op_types_to_quantize=["Conv", "MatMul"])
    model = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "ConvInteger" for n in model.graph.node)
    sites = [s.tensor for s in list_sites(GraphInfo(model, example=calibration[:1])) if s.kind == "activation"]
    assert default_layers(model) == sites and "c1" in sites
    clip_pass = RangeClipPass(calibration)
    out = clip_pass.run(model)
    assert clip_pass.parity_max_abs == 0.0 and set(clip_pass.ranges) == set(sites)
    # one image at a time, as the graph is deployed (a batch would share one dynamic scale)
    assert clip_pass.ranges["c1"] == max(float(np.max(np.abs(run_exposed(model, ["c1"], {"x": calibration[i:i + 1]})[0])))
                                         for i in range(len(calibration)))
    loud = (calibration[:1] * 50.0).astype(np.float32)
    raw_c1, = run_exposed(model, ["c1"], {"x": loud})
    clipped_relu, = run_exposed(out, ["r1"], {"x": loud})
    np.testing.assert_array_equal(clipped_relu, np.maximum(clamp_to_range(raw_c1, clip_pass.ranges["c1"]), 0))
