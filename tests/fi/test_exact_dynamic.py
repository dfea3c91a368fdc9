"""The exact analysis of a dynamically quantised classifier, against every fault run through ONNX Runtime.

The brute force runs each image alone (a batch would share one dynamic scale) with each fault applied:
the stored int8 weight and the float bias fed as graph inputs, the features fed to the classifier's tail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact_dynamic import dynamic_classifier
from harden.fi.exact_onnx import analyse_model
from harden.fi.outcome import fault_outcome
from harden.graph.ort import expose, make_session
from tests.fi.tiny_models import linear_mlp

C, K = 5, 4  # linear_mlp's classifier: features × classes


def _dynamic(model: onnx.ModelProto, tmp_path: Path, **kw) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), **kw)
    return onnx.load(tmp_path / "d.onnx")


def _fed(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with initializer `name` turned into a graph input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = next(t for t in m.graph.initializer if t.name == name)
    m.graph.initializer.remove(init)
    m.graph.input.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return m


def _brute(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{role: (SDC per bit, non-finite per bit)}, each image run alone with each fault."""
    head = dynamic_classifier(model)
    assert head is not None
    alone = make_session(expose(model, [head.features, head.output]), opt_level="disable")
    golden = [alone.run(["logits", head.features, head.output], {"x": x[i:i + 1]}) for i in range(len(x))]
    top1 = [np.argmax(run[0]) for run in golden]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def count(role: str, width: int, size: int, scores) -> None:  # type: ignore[no-untyped-def]
        sdc, due = np.zeros(width, np.int64), np.zeros(width, np.int64)
        for bit in range(width):
            for k in range(size):
                for i in range(len(x)):
                    s, d = fault_outcome(scores(i, k, bit).reshape(1, -1), np.array([top1[i]]))
                    sdc[bit] += int(s[0])
                    due[bit] += int(d[0])
        out[role] = (sdc, due)

    def flipped(values: np.ndarray, k: int, bit: int) -> np.ndarray:
        v = values.copy()
        v.reshape(-1)[k] = flip(values.reshape(-1)[k:k + 1], np.array([bit]), values.dtype.name
                                if values.dtype.kind in "iu" else "fp32")[0]
        return v

    for role, name, stored in [("weight", head.weight_name, head.weight), ("bias", head.bias_name, head.bias)]:
        if stored is None:
            continue
        session = make_session(_fed(model, name), opt_level="disable")
        count(role, 8 * stored.dtype.itemsize, stored.size,
              lambda i, k, bit, s=session, n=name, v=stored: s.run(["logits"], {"x": x[i:i + 1], n: flipped(v, k, bit)})[0])
    inferred = onnx.shape_inference.infer_shapes(model)
    tail = make_session(onnx.utils.Extractor(inferred).extract_model([head.features], ["logits"]), opt_level="disable")
    count("input", 32, C, lambda i, k, bit: tail.run(None, {head.features: flipped(golden[i][1], k, bit)})[0])
    after = make_session(onnx.utils.Extractor(inferred).extract_model([head.output], ["logits"]), opt_level="disable")
    count("output", 32, K, lambda i, k, bit: after.run(None, {head.output: flipped(golden[i][2], k, bit)})[0])
    return out


@pytest.mark.parametrize("kind", ["int8", "uint8", "per-channel", "no-bias", "tied", "scaled"])
def test_every_fault_matches_onnx_runtime_run_alone(tmp_path: Path, kind: str) -> None:
    kw = {"weight_type": QuantType.QUInt8} if kind == "uint8" else {"per_channel": True} if kind == "per-channel" else {}
    model = _dynamic(linear_mlp(3, bias=kind != "no-bias", tied=kind == "tied", scale=kind == "scaled"), tmp_path,
                     **kw)
    x = np.random.default_rng(0).normal(size=(5, 1, 2, 3)).astype(np.float32)
    result = analyse_model(model, x)
    want = _brute(model, x)
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


def test_a_softmax_after_it_or_a_clamp_is_refused(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 1, 2, 3)).astype(np.float32)
    with pytest.raises(HardenError, match="classifier"):
        analyse_model(_dynamic(linear_mlp(3, softmax=True), tmp_path), x)
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
    from harden.fi.exact_dynamic import _Golden, _one_class_sdc

    scores = np.array([[1.0, 3.0, 3.0, 0.5], [3.0, 5.0, 1.0, 2.0]], np.float32)
    none = np.zeros((2, 4))
    g = _Golden(none, none, none[:, 0], none[:, 0], none, none, scores, scores, np.array([1, 1]))
    rows = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    ks = np.array([0, 2, 2, 1, 1, 1, 1, 1])
    values = np.array([3.0, 3.0, 3.5, 3.0, 2.9, np.nan, 3.0, 3.25])
    assert _one_class_sdc(g, rows, ks, values).tolist() == [True, False, True, False, True, True, True, False]
