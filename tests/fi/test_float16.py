"""Float16 graphs, as onnxconverter-common writes them: their own fp16 bits are flipped, and every engine path
agrees with its reference on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxconverter_common import float16

from harden.errors import HardenError
from harden.fi.bitflip import flip, stuck_at
from harden.fi.faults import FaultModel, resolve_format
from harden.fi.graphinfo import GraphInfo
from harden.fi.sites import list_sites
from harden.graph.model_input import input_dtype
from tests.fi.test_cone import _check_against_whole_graph, assert_engines_agree, campaigns_by_engine
from tests.fi.test_engine_paths import _weight_check
from tests.fi.tiny_models import labelled_inputs, matmul_mlp, residual_cnn, windowed_cnn


def half(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """The model converted to float16 the way users do it; with `keep_io_types` its input and scores stay
    float32 around Casts."""
    return float16.convert_float_to_float16(model, keep_io_types=keep_io_types)


def test_native_fp16_flips_work_on_the_stored_bits() -> None:
    """Each pattern as a float16 graph holds it, NaN payloads included (a float32 round trip would quiet a
    signalling NaN)."""
    values = np.array([1.0, -2.5, np.inf, 6.1e-5, 0.0], dtype=np.float16)
    bits = np.array([14, 15, 0, 10, 9])
    got = flip(values, bits, "fp16")
    assert got.dtype == np.float16
    want = values.view(np.uint16) ^ (np.uint16(1) << bits.astype(np.uint16))
    assert np.array_equal(got.view(np.uint16), want)
    assert got.view(np.uint16)[2] == 0x7C01  # +inf with its lowest bit flipped: a signalling NaN, kept
    assert np.array_equal(stuck_at(values, bits, 1, "fp16").view(np.uint16),
                          values.view(np.uint16) | (np.uint16(1) << bits.astype(np.uint16)))


def test_the_format_defaults_to_what_the_graph_stores() -> None:
    x, _ = labelled_inputs(residual_cnn(), 1)
    single = list_sites(GraphInfo(residual_cnn(), example=x))
    halved = list_sites(GraphInfo(half(residual_cnn()), example=x.astype(np.float16)))
    assert {s.dtype for s in single} == {"float32"} and {s.dtype for s in halved} == {"float16"}
    assert resolve_format(FaultModel(), single).fmt == "fp32"
    assert resolve_format(FaultModel(), halved).fmt == "fp16"
    assert resolve_format(FaultModel(fmt="fp16"), single).fmt == "fp16"  # emulated in a float32 graph, as before
    for fmt in ("fp32", "int8", "bf16"):
        with pytest.raises(HardenError, match=f"--format {fmt} cannot be stored in float16 site"):
            resolve_format(FaultModel(fmt=fmt), halved)
    with pytest.raises(HardenError, match=r"bit positions \[20\] are outside 0..15 for fp16"):
        resolve_format(FaultModel(bits=(20,)), halved)


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
@pytest.mark.parametrize("make", [lambda: windowed_cnn(), lambda: residual_cnn(stride=2)], ids=["windowed", "residual"])
def test_cone_equals_the_whole_graph_bit_for_bit_in_float16(make, keep_io_types: bool) -> None:  # type: ignore[no-untyped-def]
    """Windows of a float16 graph give the bits of its whole tensors (fp16 flips, NaN and ±inf included; a
    NaN score's payload aside, see _same_bits)."""
    model = half(make(), keep_io_types)
    x, _ = labelled_inputs(make(), 5)
    _check_against_whole_graph(model, x.astype(input_dtype(model)), faults=40, any_nan=True)


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
def test_float16_weight_faults_match_the_slow_path(cone: bool) -> None:
    """The additive fast path adds the change in float32 and rounds once to float16; the reference reruns a
    copy of the model with the faulty stored weight. They agree to float16 rounding."""
    for model, names in ((half(matmul_mlp(seed=2)), ("w1", "w2", "b1", "b2")),
                         (half(residual_cnn(seed=5, stride=2)), ("w1", "b1", "w2", "wf", "bf"))):
        for name in names:
            _weight_check(model, name, cone=cone, rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
def test_a_float16_campaign_flips_16_bits_and_both_engines_agree(tmp_path: Path, keep_io_types: bool) -> None:
    model = half(windowed_cnn(), keep_io_types)
    x, y = labelled_inputs(windowed_cnn(), 24)
    contents = campaigns_by_engine(model, x, y, tmp_path, injections=60)
    for c in contents.values():
        assert c.header["config"]["fault"]["fmt"] == "fp16"
        assert all(s["dtype"] == "float16" for s in c.header["sites"])
    records = list(contents["cone"].records())
    bits = {b for r in records for b in r["bits"]}
    assert bits <= set(range(16)) and len(bits) > 8
    for r in records:  # the recorded faulty value is the golden one with its fp16 bit flipped
        if all(isinstance(r[k], float) for k in ("golden", "faulty")):  # non-finite values are written as text
            g = np.float16(r["golden"]).view(np.uint16)
            assert np.float16(r["faulty"]).view(np.uint16) == g ^ (1 << r["bits"][0])
    assert_engines_agree(contents)
