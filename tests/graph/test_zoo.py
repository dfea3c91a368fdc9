"""The text-head pass on the onnx wheel's light model-zoo graphs (opset 9, placeholder weights).

The placeholder weights make the real features astronomically large, so besides
running each hardened model once, the grafted head is checked on random
features by cutting the hardened graph at the head's input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch

from harden.graph.locate import locate_classifier
from harden.graph.ort import make_session
from harden.graph.passes import random_inputs
from harden.graph.text_head import PREFIX, TextHeadPass
from harden.head import TextGuidedHead
from tests.graph.tiny_models import random_head_npz_params

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = {
    "resnet50": "gemm", "vgg19": "gemm", "bvlc_alexnet": "gemm", "inception_v1": "gemm", "inception_v2": "gemm",
    "shufflenet": "gemm", "zfnet512": "gemm", "densenet121": "conv1x1", "squeezenet": "conv1x1-relu-gap",
}


def _load(name: str) -> onnx.ModelProto:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    return onnx.load(str(path))


def _head_only(model: onnx.ModelProto, features: str, scores: str) -> onnx.ModelProto:
    """The hardened graph between the head's input and the scores."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.inputs = [tensors[features].to_variable(dtype=np.float32, shape=["N", None])]
    graph.outputs = [tensors[scores]]
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_graph_is_rewritten(name: str) -> None:
    model = _load(name)
    before = model.SerializeToString()
    info = locate_classifier(model)
    assert info.kind == ZOO[name] and info.num_classes == 1000
    head = random_head_npz_params(info.in_features, info.num_classes, embed_dim=32)
    out = TextHeadPass(head).run(model)
    assert model.SerializeToString() == before
    onnx.checker.check_model(out)
    assert [(o.name, o.type.tensor_type.shape) for o in out.graph.output] == \
        [(o.name, o.type.tensor_type.shape) for o in model.graph.output]

    head_input = info.features if info.kind == "gemm" else f"{PREFIX}/features"
    cut = make_session(_head_only(out, head_input, info.scores))
    feats = np.random.default_rng(0).standard_normal((3, info.in_features)).astype(np.float32)
    (scores,) = cut.run(None, {head_input: feats})
    with torch.no_grad():
        want = TextGuidedHead.from_params(head)(torch.from_numpy(feats)).numpy()
    np.testing.assert_allclose(scores.reshape(3, -1), want, atol=1e-5, rtol=0)

    session = make_session(out)
    (probs,) = session.run(None, random_inputs(out, batch=1, seed=0))
    assert probs.shape == tuple(d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim)
