"""The exact analysis of a dynamically quantised classifier, against every fault run through ONNX Runtime.

The brute force (tests/fi/exact_brute.brute_dynamic) runs each image alone (a batch would share one dynamic
scale) through the classifier with each fault applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from harden.errors import HardenError
from harden.fi.dynamic_head import dynamic_classifier
from harden.fi.exact_onnx import analyse_model
from tests.fi.exact_brute import brute_dynamic
from tests.fi.tiny_models import classifier, linear_mlp, saturating_head

C, K = 5, 4  # linear_mlp's classifier: features × classes


def _dynamic(model: onnx.ModelProto, tmp_path: Path, **kw) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), **kw)
    return onnx.load(tmp_path / "d.onnx")


@pytest.mark.parametrize("kind", ["int8", "uint8", "per-channel", "no-bias", "tied", "scaled", "Softmax",
                                  "LogSoftmax", "near-tied Softmax"])
def test_every_fault_matches_onnx_runtime_run_alone(tmp_path: Path, kind: str) -> None:
    kw = {"weight_type": QuantType.QUInt8} if kind == "uint8" else {"per_channel": True} if kind == "per-channel" else {}
    post = kind.split()[-1] if kind.endswith("Softmax") else ""
    # near-tied: two classes 2e-5 apart, just outside the Softmax's tie band, so that faults land inside it
    model = _dynamic(linear_mlp(3, bias=kind != "no-bias", tied="tied" in kind, scale=kind == "scaled", softmax=post,
                                gap=2e-5 if "near" in kind else 0.0), tmp_path, **kw)
    x = np.random.default_rng(0).normal(size=(5, 1, 2, 3)).astype(np.float32)
    result = analyse_model(model, x)
    assert result.rounding_ties == 0 and result.head.endswith(f"MatMulInteger{' + ' + post if post else ''})")
    want = brute_dynamic(model, x)
    assert {s.role for s in result.sites} == set(want)
    for site in result.sites:
        sdc, due = want[site.role]
        assert site.sdc == sdc.tolist(), site.role
        assert site.due == due.tolist(), site.role
        assert site.total_faults == site.elements * len(site.faults) * len(x)
    inputs = next(s for s in result.sites if s.role == "input")
    # both input paths ran: kept scales (a sign flip of a positive feature always requantises the row)
    assert 0 < inputs.recomputed < inputs.total_faults and inputs.total_sdc > 0
    assert result.site(dynamic_classifier(model).output).total_due > 0  # an exponent flip to Inf or NaN


def _pooled_conv(seed: int) -> onnx.ModelProto:
    """x (N×2×4×4) → Conv 3×3 → Relu → GlobalAveragePool → 1×1 Conv classifier with bias → scores N×4×1×1, as
    the model zoo's DenseNet-121 ends."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(C, 2, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=(K, C, 1, 1)).astype(np.float32), "wc"),
             numpy_helper.from_array(rng.normal(size=K).astype(np.float32) * 0.1, "bc")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["feat"], name="pool"),
             helper.make_node("Conv", ["feat", "wc", "bc"], ["logits"], name="fc")]
    return classifier(nodes, inits, "pooled_conv", (2, 4, 4), K, spatial=(1, 1))


def test_a_1x1_conv_integer_classifier_on_a_pooled_map_matches_onnx_runtime(tmp_path: Path) -> None:
    model = _dynamic(_pooled_conv(4), tmp_path, op_types_to_quantize=["Conv"], per_channel=True)
    x = np.random.default_rng(1).normal(size=(5, 2, 4, 4)).astype(np.float32)
    result = analyse_model(model, x)
    assert result.head == "dynamic integer linear (DynamicQuantizeLinear + ConvInteger)"
    want = brute_dynamic(model, x)
    assert {s.role for s in result.sites} == set(want) == {"weight", "bias", "input", "output"}
    for site in result.sites:
        assert (site.sdc, site.due) == (want[site.role][0].tolist(), want[site.role][1].tolist()), site.role


def test_a_clamp_is_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 2, 3)).astype(np.float32)
    with pytest.raises(HardenError, match="quantised dynamically"):
        analyse_model(_dynamic(linear_mlp(3), tmp_path), x, policy="range")


def test_a_flip_keeps_the_row_scale_only_if_the_row_range_stays() -> None:
    """DynamicQuantizeLinear's scale depends on min(0, min f) and max(0, max f) alone."""
    from harden.fi.exact_dynamic import _range_kept

    f = np.array([[0.5, 2.0, 1.0, 2.0], [0.5, 2.0, 1.0, 0.25]], np.float32)
    faulty = f[None].copy()
    kept = _range_kept(f, faulty)
    assert kept.all()  # no change
    faulty[0, :, 1] = 1.5  # the row's top value lowered: kept only where another element holds it too
    faulty[0, :, 2] = -1.0  # a sign flip below 0: never kept
    faulty[0, :, 3] = 3.0  # above the top: never kept
    faulty[0, 1, 0] = np.nan
    assert _range_kept(f, faulty)[0].tolist() == [[True, True, False, False], [False, False, False, False]]


def test_one_class_faults_follow_argmax_first_index_and_nan_rules() -> None:
    """argmax takes the first of equal scores, and NaN never wins (harden.fi.outcome)."""
    from harden.fi.dynamic_judges import Golden, one_class_sdc

    scores = np.array([[1.0, 3.0, 3.0, 0.5], [3.0, 5.0, 1.0, 2.0]], np.float32)
    none = np.zeros((2, 4))
    g = Golden(none, none, none[:, 0], none[:, 0], none, none, scores, scores, np.array([1, 1]))
    rows = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    ks = np.array([0, 2, 2, 1, 1, 1, 1, 1])
    values = np.array([3.0, 3.0, 3.5, 3.0, 2.9, np.nan, 3.0, 3.25])
    assert one_class_sdc(g, rows, ks, values).tolist() == [True, False, True, False, True, True, True, False]


def test_a_fault_within_the_softmax_tie_band_is_decided_by_onnx_runtime() -> None:
    """Scores 0.25 and the next float32 up become equal probabilities, so argmax keeps the first class: the
    logits alone would call this fault an SDC, ONNX Runtime's Softmax does not."""
    from types import SimpleNamespace

    from harden.fi.dynamic_judges import Golden, Post, one_class_outcome

    node = helper.make_node("Softmax", ["s"], ["p"], axis=1)
    graph = helper.make_graph([node], "post", [], [])
    head = SimpleNamespace(post=(node,), scores="s", model=helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17)]))
    head.model.ir_version = 8
    scores = np.array([[0.25, 0.2, -1.0]], np.float32)
    none = np.zeros((1, 3))
    g = Golden(none, none, none[:, 0], none[:, 0], none, none, scores, scores, np.array([0]), score_shape=(1, 3))
    post = Post(head, g, ("CPUExecutionProvider",))  # type: ignore[arg-type]
    up = np.nextafter(np.float32(0.25), np.float32(1))
    rows, ks = np.array([0, 0, 0]), np.array([1, 1, 0])
    sdc, due = one_class_outcome(g, post, rows, ks, np.array([up, 0.3, np.nan], np.float32))
    assert sdc.tolist() == [False, True, True] and due.tolist() == [False, False, True]


def test_products_that_saturate_in_int16_pairs_match_onnx_runtime(tmp_path: Path) -> None:
    """On a CPU whose uint8 × int8 kernel saturates in pairs (AVX2 without VNNI), both the golden accumulators
    and the faults' moves saturate: every fault still matches ONNX Runtime. Elsewhere the same model checks the
    exact sum."""
    model = _dynamic(saturating_head(), tmp_path)
    x = np.random.default_rng(3).uniform(0.85, 1.0, size=(6, 8)).astype(np.float32)
    head = dynamic_classifier(model)
    assert head is not None
    result = analyse_model(model, x)
    want = brute_dynamic(model, x)
    for site in result.sites:
        assert (site.sdc, site.due) == (want[site.role][0].tolist(), want[site.role][1].tolist()), site.role
    assert result.site(head.weight_name).total_sdc > 0
    assert ("saturating" in result.fmt) == head.kernel.saturates
