"""The text-head pass on tiny models: ORT equals the torch TextGuidedHead, interface kept, input untouched."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from harden.errors import HardenError
from harden.graph.locate import locate_classifier
from harden.graph.onnx_io import get_metadata, set_metadata
from harden.graph.opset import default_opset
from harden.graph.passes import random_inputs, run_exposed
from harden.graph.text_head import PREFIX, TextHeadPass
from harden.head import HeadParams, TextGuidedHead
from tests.graph.tiny_models import KINDS, random_head_npz_params, tiny_classifier


def _head_for(model: onnx.ModelProto, **kwargs: object) -> HeadParams:
    info = locate_classifier(model)
    return random_head_npz_params(info.in_features, info.num_classes, **kwargs)  # type: ignore[arg-type]


def _head_input(info_kind: str, features: str) -> str:
    return f"{PREFIX}/features" if info_kind.startswith("conv") else features


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_ort_matches_torch_head_and_keeps_the_interface(kind: str, softmax: bool) -> None:
    model = tiny_classifier(kind, softmax)
    before = model.SerializeToString()
    info = locate_classifier(model)
    head = _head_for(model)
    graft = TextHeadPass(head)
    assert graft.check(model) is None
    out = graft.run(model)
    assert model.SerializeToString() == before, "the pass mutated its input"
    onnx.checker.check_model(out, full_check=True)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in out.graph.output] == \
        [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output]
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("Softmax") == int(softmax)
    assert {"ReduceL2", "Max", "Div", "MatMul", "Mul"} <= set(ops)
    assert "fc_w" not in {t.name for t in out.graph.initializer}, "the old classifier weights remain"

    feeds = random_inputs(model, batch=4, seed=3)
    feats, scores, final = run_exposed(out, [_head_input(info.kind, info.features), info.scores,
                                             out.graph.output[0].name], feeds)
    torch_head = TextGuidedHead.from_params(head)
    with torch.no_grad():
        want = torch_head(torch.from_numpy(feats.reshape(4, -1))).numpy()
    assert scores.shape[:2] == (4, head.num_classes)
    np.testing.assert_allclose(scores.reshape(4, -1), want, atol=1e-5, rtol=0)
    if softmax:
        np.testing.assert_allclose(final, torch.softmax(torch.from_numpy(want), dim=1).numpy(), atol=1e-6)
    else:
        np.testing.assert_allclose(final.reshape(4, -1), want, atol=1e-5, rtol=0)


def test_normalisation_epsilon_matches_torch_for_a_zero_projection() -> None:
    model = tiny_classifier("gemm-transB1", False)
    head = _head_for(model)
    head.proj_weight[:] = 0
    head.proj_bias[:] = 0  # z = 0: F.normalize divides by eps, giving zeros, not NaN
    out = TextHeadPass(head).run(model)
    (scores,) = run_exposed(out, ["scores"], random_inputs(model, 2, seed=0))
    assert np.all(scores == 0)


def test_metadata_is_kept_and_provenance_recorded() -> None:
    model = tiny_classifier("gemm-transB1", True)
    set_metadata(model, {"harden.preprocess": '{"channels": 1}', "harden.classes": ["a"] * 10, "other": "x"})
    head = _head_for(model)
    out = TextHeadPass(head).run(model)
    meta = get_metadata(out)
    assert meta["harden.preprocess"] == '{"channels": 1}' and meta["other"] == "x"
    assert json.loads(meta["harden.classes"]) == ["a"] * 10
    assert meta["harden.pass"] == "text-head"
    assert meta["harden.embeddings_sha256"] == head.embeddings_sha256
    config = json.loads(meta["harden.config"])
    assert config["parity_max_abs"] < 1e-4 and config["num_classes"] == 10
    history = json.loads(meta["harden.passes"])
    assert [h["pass"] for h in history] == ["text-head"]


def test_dimension_mismatches_are_refused() -> None:
    model = tiny_classifier("matmul-add", False)
    info = locate_classifier(model)
    wrong_classes = random_head_npz_params(info.in_features, info.num_classes + 1)
    assert "classes" in (TextHeadPass(wrong_classes).check(model) or "")
    with pytest.raises(HardenError, match="11 classes"):
        TextHeadPass(wrong_classes).run(model)
    wrong_features = random_head_npz_params(info.in_features - 1, info.num_classes)
    with pytest.raises(HardenError, match="features"):
        TextHeadPass(wrong_features).run(model)


@pytest.mark.parametrize("opset", [9, 13, 18, 21])
def test_every_opset_form_of_the_head(opset: int) -> None:
    model = tiny_classifier("gemm-transB1", True, opset=opset)
    head = _head_for(model)
    out = TextHeadPass(head).run(model)
    assert default_opset(out) == opset
    reduce = next(n for n in out.graph.node if n.op_type == "ReduceL2")
    assert (len(reduce.input) == 2) == (opset >= 18)
    feats, scores = run_exposed(out, ["feat", "scores"], random_inputs(model, 2, seed=1))
    np.testing.assert_allclose(scores, head.logits(feats), atol=1e-5)


def test_an_opset_8_model_is_upgraded_and_says_so() -> None:
    model = tiny_classifier("gemm-transB1", True, opset=8)
    graft = TextHeadPass(_head_for(model))
    out = graft.run(model)
    assert default_opset(out) == 9
    assert graft.config()["upgraded_from_opset"] == 8
    assert json.loads(get_metadata(out)["harden.config"])["upgraded_from_opset"] == 8


def test_a_hardened_model_is_not_hardened_twice() -> None:
    model = tiny_classifier("gemm-transB1", True)
    out = TextHeadPass(_head_for(model)).run(model)
    with pytest.raises(HardenError, match="already has a text-guided head"):
        TextHeadPass(_head_for(model)).run(out)
