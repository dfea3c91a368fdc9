"""Model I/O: corrupt files get one clear error; saves are atomic and keep metadata."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.graph.onnx_io import get_metadata, load_model, save_model, set_metadata
from harden.graph.ort import expose, make_session, run_batched


def tiny_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    model = tiny_model()
    set_metadata(model, {"harden.classes": ["a", "b"], "note": "x"})
    save_model(model, tmp_path / "m.onnx")
    loaded = load_model(tmp_path / "m.onnx")
    assert get_metadata(loaded) == {"harden.classes": '["a", "b"]', "note": "x"}
    with pytest.raises(HardenError, match="overwrite"):
        save_model(loaded, tmp_path / "m.onnx", source=tmp_path / "m.onnx")


@pytest.mark.parametrize("content", [b"", b"this is not protobuf \xff\xfe", None])
def test_corrupt_models_are_refused(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.onnx"
    if content is None:  # a truncated download
        save_model(tiny_model(), tmp_path / "good.onnx")
        content = (tmp_path / "good.onnx").read_bytes()[:40]
    path.write_bytes(content)
    with pytest.raises(HardenError, match="bad.onnx"):
        load_model(path)


def test_expose_gives_intermediate_values() -> None:
    session = make_session(expose(tiny_model(), ["h"]), opt_level="disable")
    x = np.array([[1.0, -1.0, 0.5]], np.float32)
    y, h = run_batched(session, x, outputs=["y", "h"])
    np.testing.assert_allclose(h, x @ np.arange(6, dtype=np.float32).reshape(3, 2))
    np.testing.assert_allclose(y, np.maximum(h, 0))
    with pytest.raises(HardenError, match="optimisation level"):
        make_session(tiny_model(), opt_level="max")
