"""`tinyresnet`: a residual network small enough to train on a shared CPU in minutes.

Three stages of one basic block each (32, 64, 128 channels) behind a stride-2
3×3 stem: about 0.3M parameters. On 28 px Fashion-MNIST the first stage runs at
14×14, which costs ~10× less than a full-resolution stem while keeping the
accuracy above 90%; it exists so the whole pipeline (fine-tune, export, harden,
inject) can be demonstrated without a GPU.
"""

from __future__ import annotations

from typing import Any


def build_tinyresnet(in_channels: int, widths: tuple[int, int, int] = (32, 64, 128)) -> Any:
    """The feature extractor (N×C×H×W → N×widths[-1]); the head is attached by `build_model`."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        """Two 3×3 convolutions with batch norm and an identity (or 1×1) shortcut."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    w1, w2, w3 = widths
    return nn.Sequential(
        nn.Conv2d(in_channels, w1, 3, 2, 1, bias=False),
        nn.BatchNorm2d(w1),
        nn.ReLU(inplace=True),
        BasicBlock(w1, w1, 1),
        BasicBlock(w1, w2, 2),
        BasicBlock(w2, w3, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
    )
