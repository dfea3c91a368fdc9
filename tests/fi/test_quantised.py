"""QDQ graphs, as onnxruntime.quantization writes them: the stored integers are the sites, flipped as stored,
and every engine path agrees with its reference on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.config import CampaignConfig
from harden.fi.engine import run_campaign
from harden.fi.faults import FaultModel, resolve_format
from harden.fi.graphinfo import GraphInfo
from harden.fi.sites import list_sites
from harden.graph.ort import make_session
from tests.fi.test_cone import _check_against_whole_graph, assert_engines_agree, campaigns_by_engine
from tests.fi.test_engine_paths import _weight_check
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, residual_cnn, windowed_cnn


def quantised(model: onnx.ModelProto, tmp_path: Path, per_channel: bool = False,
              activations: QuantType = QuantType.QInt8, fmt: QuantFormat = QuantFormat.QDQ,
              op_types: list[str] | None = None) -> onnx.ModelProto:
    """The model quantised the way users do it: static, QDQ format (or `fmt`), int8 weights (int32 biases),
    calibrated on its own random inputs; `op_types` limits the ops quantised."""
    x, _ = labelled_inputs(model, 16)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    source, out = tmp_path / "float.onnx", tmp_path / f"q{int(per_channel)}{activations.name}{fmt.name}.onnx"
    onnx.save(model, source)
    quantize_static(str(source), str(out), Reader(), quant_format=fmt, per_channel=per_channel,
                    op_types_to_quantize=op_types, activation_type=activations, weight_type=QuantType.QInt8)
    return onnx.load(out)


def test_stored_integers_flip_as_stored() -> None:
    q = np.array([3, -128, 0, 127], dtype=np.int8)
    got = flip(q, np.array([7, 7, 0, 6]), "int8")
    assert got.dtype == np.int8 and got.tolist() == [-125, 0, 1, 63]
    assert flip(np.array([3, 255], np.uint8), np.array([7, 0]), "uint8").tolist() == [131, 254]
    assert flip(np.array([5], np.int32), np.array([31]), "int32").tolist() == [5 - 2**31]
    with pytest.raises(HardenError, match="int32 is a quantised graph's stored integer"):
        flip(np.float32([1.0]), np.array([3]), "int32")


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_a_qdq_graph_s_sites_are_its_stored_integers(tmp_path: Path, per_channel: bool) -> None:
    """Each layer: its requantised int8 output, its int8 weight and int32 bias (not the float tensors that
    DequantizeLinear makes of them, which no deployment stores); decoded exactly as ONNX Runtime does."""
    model = quantised(residual_cnn(), tmp_path, per_channel)
    x, _ = labelled_inputs(residual_cnn(), 2)
    info = GraphInfo(model, example=x[:1])
    sites = {s.name: s for s in list_sites(info)}
    assert set(sites) == {"r1_QuantizeLinear_Output", "w1_quantized", "b1_quantized", "c2_QuantizeLinear_Output",
                          "w2_quantized", "b2_quantized", "logits_QuantizeLinear_Output", "wf_quantized",
                          "bf_quantized"}
    assert sites["r1_QuantizeLinear_Output"].node == "conv1" and sites["r1_QuantizeLinear_Output"].dtype == "int8"
    assert sites["w2_quantized"].dtype == "int8" and sites["w2_quantized"].decoded == "w2_DequantizeLinear_Output"
    assert sites["b2_quantized"].dtype == "int32" and sites["b2_quantized"].input_index == 2
    from harden.graph.ort import expose

    names = list(info.dequantized)
    decoded = make_session(expose(model, names), opt_level="disable").run(names, {"x": x})
    for name, value in zip(names, decoded):  # numpy's decoding is ONNX Runtime's, bit for bit
        assert np.array_equal(info.constants[name].view(np.uint32), value.view(np.uint32)), name
    assert resolve_format(FaultModel(), list(sites.values())).fmt is None  # int8 and int32: each its own
    with pytest.raises(HardenError, match="--format fp32 cannot be stored in int8 site"):
        resolve_format(FaultModel(fmt="fp32"), list(sites.values()))


@pytest.mark.parametrize("activations", [QuantType.QInt8, QuantType.QUInt8], ids=["int8", "uint8"])
@pytest.mark.parametrize("make", [lambda: windowed_cnn(), lambda: residual_cnn(stride=2)], ids=["windowed", "residual"])
def test_cone_equals_the_whole_graph_bit_for_bit_in_a_qdq_graph(make, activations, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Windows through QuantizeLinear and DequantizeLinear give the bits of whole tensors, with the faults
    on the stored int8 (or uint8) activations."""
    model = quantised(make(), tmp_path, activations=activations)
    x, _ = labelled_inputs(make(), 5)
    _check_against_whole_graph(model, x, faults=40)


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_stored_integer_weight_faults_match_the_slow_path(cone: bool, per_channel: bool, tmp_path: Path) -> None:
    """The fast path decodes the faulty integer and adds the change; the reference reruns a copy of the
    model whose stored integer is flipped, through its own DequantizeLinear."""
    for model, names in ((quantised(residual_cnn(seed=5, stride=2), tmp_path, per_channel),
                          ("w1_quantized", "b1_quantized", "w2_quantized", "wf_quantized", "bf_quantized")),
                         (quantised(matmul_mlp(seed=2), tmp_path, per_channel), ("w1_quantized", "b1_quantized"))):
        int32 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT32}
        for name in names:  # an int8 code goes to its far extreme; an int32 bias's unit (input × weight scale)
            # is tiny, so it moves by thousands
            _weight_check(model, name, cone=cone, rtol=1e-4, atol=1e-4, shifts=(-3000.0, 2500.0, 7000.0),
                          opposite=name not in int32)


def test_a_qdq_campaign_flips_stored_integers_and_both_engines_agree(tmp_path: Path) -> None:
    model = quantised(windowed_cnn(), tmp_path)
    x, y = labelled_inputs(windowed_cnn(), 24)
    contents = campaigns_by_engine(model, x, y, tmp_path, injections=60)
    header = contents["cone"].header
    assert header["config"]["fault"]["fmt"] is None  # int8 and int32 sites, each flipped in its own format
    assert {s["dtype"] for s in header["sites"]} == {"int8", "int32"}
    width = {s["name"]: 32 if s["dtype"] == "int32" else 8 for s in header["sites"]}
    for r in contents["cone"].records():  # the recorded faulty value is the stored integer with its bit flipped
        (bit,) = r["bits"]
        assert bit < width[r["site"]]
        fmt = "int32" if width[r["site"]] == 32 else "int8"
        kind = np.int32 if fmt == "int32" else np.int8
        assert int(r["faulty"]) == int(flip(np.array([int(r["golden"])], kind), np.array([bit]), fmt)[0])
    assert_engines_agree(contents)
    with pytest.raises(HardenError, match="--clamp range applies to float values"):
        run_campaign(model, x, y, CampaignConfig(injections=4, clamp="range"), tmp_path / "clamp.jsonl",
                     progress=False)
    assert not (tmp_path / "clamp.jsonl").exists()  # refused before anything is written


def test_a_shared_stored_weight_reruns_the_whole_model_with_the_faulty_integer(tmp_path: Path) -> None:
    """Two convs read one int8 weight: one site, and each fault reaches both readers (the whole model runs
    with the stored integer replaced, bit for bit the slow path)."""
    from harden.fi.reference import weight_full
    from tests.fi.test_engine_paths import _runner
    from tests.fi.tiny_models import tied_cnn

    model = quantised(tied_cnn(), tmp_path)
    x, _ = labelled_inputs(tied_cnn(), 6)
    _, runner, cache, golden, site = _runner(model, "w_quantized", x)
    assert site.shared and site.dtype == "int8" and runner.whole is not None
    elems = np.arange(len(x)) * 7
    gold = runner.golden_values(cache, slice(0, len(x)), elems)
    faulty = np.where(gold >= 0, -128, 127).astype(np.int8)
    fast = runner.scores(cache, slice(0, len(x)), elems, gold, faulty)
    for i in range(len(x)):
        np.testing.assert_array_equal(fast[i], weight_full(model, x[i:i + 1], site.tensor, int(elems[i]),
                                                           int(faulty[i]))[0])
    assert not np.allclose(fast, golden)


def test_uint8_weights_with_zero_points_decode_as_onnx_runtime_does(tmp_path: Path) -> None:
    """Asymmetric uint8 weights (a zero point per channel): faults decode through it on the fast path."""
    x, _ = labelled_inputs(residual_cnn(), 2)
    source = tmp_path / "float.onnx"
    onnx.save(residual_cnn(seed=3), source)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(source), str(tmp_path / "u8.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    model = onnx.load(tmp_path / "u8.onnx")
    sites = {s.name: s for s in list_sites(GraphInfo(model, example=x[:1]))}
    assert sites["w2_quantized"].dtype == "uint8" and sites["r1_QuantizeLinear_Output"].dtype == "uint8"
    for cone in (False, True):
        for name in ("w1_quantized", "w2_quantized", "wf_quantized"):
            _weight_check(model, name, cone=cone, rtol=1e-4, atol=1e-4, opposite=True)
