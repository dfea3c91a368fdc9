"""QOperator graphs (the model zoo's int8 format): integer layers whose stored inputs and outputs are the sites,
every node run in ONNX Runtime's own integer kernels, and every engine path bit-exact against its reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantFormat, QuantType

from harden.fi.bitflip import flip
from harden.fi.graphinfo import GraphInfo
from harden.fi.nodes import NodeSessions
from harden.fi.sites import list_sites
from harden.report.cost import flop_count, parameter_count
from tests.fi.test_cone import _check_against_whole_graph, assert_engines_agree, campaigns_by_engine
from tests.fi.test_engine_paths import _weight_check
from tests.fi.test_quantised import quantised
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, residual_cnn, stem_cnn, windowed_cnn


def qoperator(model: onnx.ModelProto, tmp_path: Path, activations: QuantType = QuantType.QUInt8,
              per_channel: bool = False) -> onnx.ModelProto:
    """The model quantised statically in QOperator format (QLinearConv, QGemm, QLinearAdd, ...)."""
    return quantised(model, tmp_path, per_channel, activations, QuantFormat.QOperator)


def test_a_qoperator_graph_s_sites_are_the_integers_its_layers_read_and_write(tmp_path: Path) -> None:
    """Each integer layer: its uint8 output, int8 weight and int32 bias; a QLinearMatMul's bias, added by a
    QLinearAdd, belongs to the layer (as a float MatMul's bias through its Add does). Parameters and FLOPs
    count the stored integers, as in the float graph."""
    model = qoperator(residual_cnn(), tmp_path)
    sites = {s.name: s for s in list_sites(GraphInfo(model))}
    assert {(s.op_type, s.kind, s.dtype) for s in sites.values()} == {
        ("QLinearConv", "activation", "uint8"), ("QLinearConv", "weight", "int8"), ("QLinearConv", "weight", "int32"),
        ("QGemm", "activation", "uint8"), ("QGemm", "weight", "int8"), ("QGemm", "weight", "int32")}
    assert sites["b2_quantized"].input_index == 8 and sites["w2_quantized"].input_index == 3
    assert parameter_count(model) == parameter_count(residual_cnn())
    assert flop_count(GraphInfo(model)) == flop_count(GraphInfo(residual_cnn()))
    mlp = {s.name: s for s in list_sites(GraphInfo(qoperator(matmul_mlp(), tmp_path)))}
    bias = mlp["b1_quantized"]
    assert bias.node == "mm1_quant" and bias.via and bias.input_index == 2 and bias.dtype == "uint8"


@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8], ids=["uint8", "int8"])
@pytest.mark.parametrize("make", [lambda: stem_cnn(), lambda: windowed_cnn(), lambda: residual_cnn(stride=2),
                                  lambda: residual_cnn(dilation=2, group=2), lambda: matmul_mlp()],
                         ids=["stem", "windowed", "residual-stride2", "residual-dilated-grouped", "mlp"])
def test_cone_equals_the_whole_graph_bit_for_bit_in_a_qoperator_graph(make, activations, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Windows through QLinearConv (its padding is the input's zero point), an integer MaxPool (its padding
    the type's minimum), QLinearAdd and QLinearConcat give the bits of whole tensors."""
    model = qoperator(make(), tmp_path, activations)
    x, _ = labelled_inputs(make(), 5)
    _check_against_whole_graph(model, x, faults=40)


def test_the_walk_runs_integer_convolutions_and_pools_on_windows(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Not only exact but windowed: a fault in the stem's first map reaches QLinearConv and the padded
    integer MaxPool as crops smaller than the map."""
    model = qoperator(stem_cnn(), tmp_path)
    x, _ = labelled_inputs(stem_cnn(), 4)
    seen: dict[str, list[tuple[int, ...]]] = {}
    run = NodeSessions.run

    def spy(self: NodeSessions, index: int, values: dict[str, np.ndarray], override=()):  # type: ignore[no-untyped-def]
        node = self.info.nodes[index]
        seen.setdefault(node.op_type, []).append(values[node.input[0]].shape[2:])
        return run(self, index, values, override)

    monkeypatch.setattr(NodeSessions, "run", spy)
    _check_against_whole_graph(model, x, faults=8, max_sites=1)
    assert any(shape[0] < 12 for shape in seen["QLinearConv"]) and any(shape[0] < 12 for shape in seen["MaxPool"])


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_stored_integer_weight_faults_equal_the_slow_path_bit_for_bit(cone: bool, per_channel: bool,
                                                                      tmp_path: Path) -> None:
    """An integer layer requantises its output, so a weight fault is no additive change: the layer reruns with
    the faulty integer, and the scores equal those of a copy of the model holding it."""
    for model, names in ((qoperator(stem_cnn(seed=5), tmp_path, per_channel=per_channel),
                          ("w1_quantized", "b1_quantized", "w2_quantized", "wf_quantized", "bf_quantized")),
                         (qoperator(matmul_mlp(), tmp_path, per_channel=per_channel),
                          ("w1_quantized", "b1_quantized", "b2_quantized"))):
        int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
        for name in names:
            _weight_check(model, name, cone=cone, rtol=0, atol=0, shifts=(-3000.0, 2500.0, 7000.0),
                          opposite=name not in int32, rerun=True)


def test_a_qoperator_campaign_flips_stored_integers_and_both_engines_agree(tmp_path: Path) -> None:
    model = qoperator(stem_cnn(), tmp_path)
    x, y = labelled_inputs(stem_cnn(), 24)
    contents = campaigns_by_engine(model, x, y, tmp_path, injections=60)
    header = contents["cone"].header
    assert header["config"]["fault"]["fmt"] is None
    dtypes = {s["name"]: s["dtype"] for s in header["sites"]}
    assert set(dtypes.values()) == {"uint8", "int8", "int32"}
    for r in contents["cone"].records():  # the recorded faulty value is the stored integer with its bit flipped
        (bit,) = r["bits"]
        kind = np.dtype(dtypes[r["site"]])
        assert bit < 8 * kind.itemsize
        assert int(r["faulty"]) == int(flip(np.array([int(r["golden"])], kind), np.array([bit]), kind.name)[0])
    assert_engines_agree(contents)
