"""The one place that turns a dataset into a model's input tensor: preprocessing resolution and shape checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from harden.data import Dataset, Preprocess
from harden.data.preprocess import IMAGENET
from harden.errors import HardenError
from harden.graph.model_input import (channels_last, input_chw, input_dims, model_inputs, model_preprocess,
                                      parse_preprocess, select_scores)
from harden.graph.onnx_io import set_metadata


def _model(dims: list[int | str], extra_inputs: int = 0) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, dims) for i in range(1 + extra_inputs)]
    node = helper.make_node("Identity", ["x0"], ["y"])
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(shape: tuple[int, ...]) -> Dataset:
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    return Dataset("t", images, np.zeros(shape[0], np.int64), ["a"])


def test_preprocessing_comes_from_override_then_metadata_then_the_input_shape() -> None:
    model = _model(["N", 3, 224, 224])
    assert model_preprocess(model) == IMAGENET
    declared = Preprocess(channels=3, size=224, mean=(0.5,), std=(0.25,))
    set_metadata(model, {"harden.preprocess": declared.to_json()})
    assert model_preprocess(model) == declared
    assert model_preprocess(model, Preprocess(channels=1)) == Preprocess(channels=1)
    assert model_preprocess(_model(["N", 1, 28, 28])) == Preprocess(channels=1, size=28)
    assert model_preprocess(_model(["N", 3, "H", "W"])) == Preprocess(channels=3, size=None)
    with pytest.raises(HardenError, match="channels"):
        model_preprocess(_model(["N", 4, 8, 8]))


def test_inferred_identity_keeps_the_images_bit_for_bit() -> None:
    data = _data((3, 1, 8, 8))
    x = model_inputs(_model(["N", 1, 8, 8]), data)
    assert x.dtype == np.float32 and x.tobytes() == data.images.tobytes()


def test_identity_takes_the_models_channels() -> None:
    """`--preprocess identity` feeds RGB images to an RGB model unchanged (it once made them grey)."""
    identity = parse_preprocess("identity")
    rgb = _data((2, 3, 8, 8))
    assert model_preprocess(_model(["N", 3, 8, 8]), identity) == Preprocess(channels=3)
    assert model_inputs(_model(["N", 3, 8, 8]), rgb, identity).tobytes() == rgb.images.tobytes()
    assert model_inputs(_model(["N", 1, 8, 8]), _data((2, 1, 8, 8)), identity).shape == (2, 1, 8, 8)


def test_inferred_preprocessing_adapts_channels_and_size() -> None:
    x = model_inputs(_model(["N", 3, 16, 16]), _data((2, 1, 8, 8)))
    assert x.shape == (2, 3, 16, 16)


def test_shape_mismatch_names_both_shapes_with_symbolic_dims_as_question_marks() -> None:
    with pytest.raises(HardenError, match=r"t: images are \(1, 8, 8\).*\(3, \?, \?\)"):
        model_inputs(_model(["N", 3, "H", "W"]), _data((2, 1, 8, 8)), Preprocess(channels=1))
    with pytest.raises(HardenError, match=r"\(3, 6, 6\).*\(3, 8, 8\)"):
        model_inputs(_model(["N", 3, 8, 8]), _data((2, 3, 6, 6)), Preprocess(channels=3))


def test_input_checks() -> None:
    assert input_dims(_model(["N", 64])) == (64,)
    assert input_chw(_model(["N", 3, "H", 5])) == (3, None, 5)
    with pytest.raises(HardenError, match="rank 2"):
        input_chw(_model(["N", 64]))
    with pytest.raises(HardenError, match="one image input, found 2"):
        input_dims(_model(["N", 1, 8, 8], extra_inputs=1))


def test_a_channels_last_model_gets_nhwc_images() -> None:
    """Models converted from TensorFlow take N×H×W×C; they were refused as a shape mismatch before."""
    nhwc, nchw = _model(["N", 16, 16, 3]), _model(["N", 3, 16, 16])
    assert channels_last(nhwc) and not channels_last(nchw) and input_chw(nhwc) == (3, 16, 16)
    assert channels_last(_model(["N", "H", "W", 1])) and input_chw(_model(["N", "H", "W", 1])) == (1, None, None)
    assert not channels_last(_model(["N", 3, 8, 3])) and not channels_last(_model(["N", "C", "H", "W"]))
    assert model_preprocess(_model(["N", 224, 224, 3])) == IMAGENET
    data = _data((2, 1, 8, 8))
    x = model_inputs(nhwc, data)
    assert x.shape == (2, 16, 16, 3) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x, model_inputs(nchw, data).transpose(0, 2, 3, 1))
    with pytest.raises(HardenError, match=r"\(3, 8, 8\) \(C, H, W\).*\(3, 16, 16\)"):
        model_inputs(nhwc, _data((2, 3, 8, 8)), Preprocess(channels=3))


def test_a_float16_input_is_fed_float16_and_other_types_are_refused_with_the_way_round() -> None:
    model = _model(["N", 3, 8, 8])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    assert input_dims(model) == (3, 8, 8)
    x = model_inputs(model, _data((2, 3, 8, 8)))
    assert x.dtype == np.float16
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    with pytest.raises(HardenError, match="'x0' is uint8; harden runs float32 and float16 models .*--format .*int8"):
        input_dims(model)
    with pytest.raises(HardenError, match="is uint8"):
        model_inputs(model, _data((2, 3, 8, 8)))


def test_the_class_scores_are_the_only_output_or_the_named_one() -> None:
    one = _model(["N", 3, 8, 8])
    assert select_scores(one) is one and select_scores(one, "y") is one
    two = _model(["N", 3, 8, 8])
    two.graph.output.insert(0, helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", 3, 8, 8]))
    with pytest.raises(HardenError, match=r"2 outputs \['x0', 'y'\]; say which .* --output NAME"):
        select_scores(two)
    with pytest.raises(HardenError, match="'z' is not an output"):
        select_scores(two, "z")
    picked = select_scores(two, "y")
    assert [o.name for o in picked.graph.output] == ["y"] and len(two.graph.output) == 2


def test_parse_preprocess() -> None:
    assert parse_preprocess("imagenet") == IMAGENET
    assert parse_preprocess("identity") == Preprocess(channels=0)
    assert parse_preprocess(IMAGENET.to_json()) == IMAGENET
    assert parse_preprocess("channels=3,size=32,mean=0.5/0.5/0.5,std=0.2/0.2/0.2") == Preprocess(
        3, 32, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(HardenError, match="cannot read"):
        parse_preprocess("colour=3")
