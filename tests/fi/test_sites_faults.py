"""Sites, selection, fault models and input validation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from harden.data import Dataset, Preprocess
from harden.errors import HardenError
from harden.fi import FaultModel, GraphInfo, list_sites, select_sites
from harden.fi.faults import parse_bits
from harden.graph.model_input import model_inputs
from tests.fi.tiny_models import matmul_mlp, residual_cnn


def test_list_sites_activations_weights_and_all_tensors() -> None:
    sites = list_sites(residual_cnn())
    assert [(s.name, s.kind) for s in sites][:3] == [("c1", "activation"), ("w1", "weight"), ("b1", "weight")]
    assert {s.name: s.elements for s in sites}["c2"] == 4 * 8 * 8
    everything = {s.name for s in list_sites(residual_cnn(), include_all_tensors=True)}
    assert {"r1", "skip", "sum", "gap", "flat"} <= everything
    mlp = {s.name: s for s in list_sites(matmul_mlp())}
    assert mlp["w2"].shape == (8, 5)  # a Constant node's tensor
    assert (mlp["b1"].node, mlp["b1"].via, mlp["b1"].input_index) == ("mm1", "add1", 2)
    assert [s.name for s in select_sites(list(mlp.values()), "last")] == ["o", "w2", "b2"]


def test_select_sites() -> None:
    sites = list_sites(residual_cnn())
    assert [s.name for s in select_sites(sites, "last")] == ["logits", "wf", "bf"]
    assert [s.name for s in select_sites(sites, "last", kinds=("weight",))] == ["wf", "bf"]
    assert [s.name for s in select_sites(sites, "conv2")] == ["c2", "w2", "b2"]
    assert [s.name for s in select_sites(sites, "re:^b")] == ["b1", "b2", "bf"]
    assert [s.name for s in select_sites(sites, "c1,wf")] == ["c1", "wf"]
    assert len(select_sites(sites, "all", kinds=("activation",))) == 3
    with pytest.raises(HardenError, match="unknown layer 'nope'"):
        select_sites(sites, "nope")
    with pytest.raises(HardenError, match="matches no"):
        select_sites(sites, "re:zzz")


@pytest.mark.parametrize("fmt,value,bit,expected", [
    ("fp32", 1.0, 31, -1.0), ("fp32", 1.0, 30, np.inf), ("fp32", 1.0, 22, 1.5), ("fp32", 2.0, 23, 4.0), ("fp32", 1.0, 23, 0.5),
    ("fp16", 1.0, 15, -1.0), ("fp16", 1.0, 14, np.inf), ("fp16", 1.0, 9, 1.5),
    ("bf16", 1.0, 15, -1.0), ("bf16", 1.0, 6, 1.5), ("bf16", 1.0, 14, np.inf),
    ("int8", 1.0, 7, -1.0 / 127), ("int8", 0.0, 6, 64.0 / 127), ("int8", 1.0, 0, 126.0 / 127),
])
def test_known_flips_in_every_format(fmt: str, value: float, bit: int, expected: float) -> None:
    scale = 1.0 / 127 if fmt == "int8" else 1.0
    out = FaultModel("flip", fmt).apply(np.float32([value]), np.array([[bit]]), np.zeros(1), scale, 1.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [expected], rtol=1e-6)


def test_draws_and_models() -> None:
    rng = np.random.default_rng(0)
    bits, _ = FaultModel("flip", "fp16", k=3).draw(rng, 500)
    assert bits.shape == (500, 3) and all(len(set(row)) == 3 for row in bits) and bits.max() <= 15
    bits, _ = FaultModel("flip", "fp32", bits=(23, 24, 25)).draw(rng, 300)
    assert set(bits.ravel()) == {23, 24, 25}
    _, u = FaultModel("random", "fp32").draw(rng, 1000)
    vals = FaultModel("random", "fp32").apply(np.zeros(1000, np.float32), np.zeros((1000, 0)), u, 1.0, 4.0)
    assert vals.min() >= -4 and vals.max() <= 4 and vals.std() > 1
    with pytest.raises(HardenError, match="not resolved"):  # the default takes its format from the sites
        FaultModel("random").apply(np.zeros(1000, np.float32), np.zeros((1000, 0)), u, 1.0, 4.0)
    assert FaultModel("stuck-at-1", "fp32").apply(np.float32([1.0]), np.array([[31]]), np.zeros(1), 1, 1)[0] == -1.0
    assert FaultModel("stuck-at-0", "fp32").apply(np.float32([1.0]), np.array([[31]]), np.zeros(1), 1, 1)[0] == 1.0
    assert parse_bits("23-25,31") == (23, 24, 25, 31) and parse_bits("all") is None
    with pytest.raises(HardenError):
        FaultModel("flip", "fp16", bits=(16,))
    with pytest.raises(HardenError):
        FaultModel("flip", "int8", k=9)
    with pytest.raises(HardenError):
        parse_bits("a-b")


def test_model_output_must_be_class_scores() -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(HardenError, match="expected class scores"):
        GraphInfo(model)


def test_data_shape_mismatch_names_both_shapes() -> None:
    model = residual_cnn()
    data = Dataset("grey", np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(HardenError, match=r"\(1, 8, 8\).*\(3, 8, 8\)"):
        model_inputs(model, data, Preprocess(channels=1))


def test_shape_arithmetic_is_pulled_into_the_suffix() -> None:
    """A Reshape whose target shape is computed from the batch size must still re-batch."""
    from harden.fi.runner import SiteRunner, prefix_cache
    from harden.fi.config import CampaignConfig

    model = residual_cnn()
    g = model.graph
    flatten = next(n for n in g.node if n.op_type == "Flatten")
    idx = list(g.node).index(flatten)
    g.node.remove(flatten)
    g.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"))
    g.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    new = [helper.make_node("Shape", ["c1"], ["shp"], name="shape"),
           helper.make_node("Gather", ["shp", "zero"], ["bsz"], name="gather", axis=0),
           helper.make_node("Concat", ["bsz", "minus1"], ["target"], name="concat", axis=0),
           helper.make_node("Reshape", ["gap", "target"], ["flat"], name="reshape")]
    for k, node in enumerate(new):
        g.node.insert(idx + k, node)
    info = GraphInfo(model)
    assert "target" not in info.cut("c2") and "shp" not in info.cut("c2")
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    site = next(s for s in list_sites(info) if s.name == "c2")
    runner = SiteRunner(info, site, CampaignConfig(), {}, {})
    cache, golden = prefix_cache(info, [runner], x, CampaignConfig())
    rows = slice(1, 4)
    elems = np.array([0, 1, 2])
    vals = runner.golden_values(cache, rows, elems)
    np.testing.assert_array_equal(runner.scores(cache, rows, elems, vals, vals), golden[rows])
