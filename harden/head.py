"""The text-guided classification head of Wasim et al. (NeurIPS 2023).

    logits = exp(s) · W · (P f + b) / ‖P f + b‖

P, b project backbone features (d) into the text-embedding space (E); W (C×E)
starts as the class embeddings with unit rows; s starts at log(1/0.07) and is
clamped at log(100) as in CLIP. Because every logit is a cosine times one bounded
scale, a bit flip upstream of the normalisation cannot blow one logit up past the
others, which is the source of the head's resilience.

`head.npz` is the exchange format between fine-tuning, `harden convert` and the
ONNX rewrite pass: keys `proj_weight` (E×d), `proj_bias` (E), `embeddings` (C×E),
`logit_scale` (s, a scalar), `eps`, `classes`, `embeddings_sha256`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from harden.errors import HardenError
from harden.files import atomic_path

if TYPE_CHECKING:
    import torch

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
NORM_EPS = 1e-12
HEAD_KEYS = ("proj_weight", "proj_bias", "embeddings", "logit_scale", "eps", "classes", "embeddings_sha256")


@dataclass
class HeadParams:
    """The text-guided head's weights as numpy arrays, independent of torch."""

    proj_weight: np.ndarray
    proj_bias: np.ndarray
    embeddings: np.ndarray
    logit_scale: float
    classes: list[str]
    embeddings_sha256: str = ""
    eps: float = NORM_EPS

    def __post_init__(self) -> None:
        e, d = self.proj_weight.shape if self.proj_weight.ndim == 2 else (-1, -1)
        if e < 0 or self.proj_bias.shape != (e,) or self.embeddings.ndim != 2 or self.embeddings.shape[1] != e:
            raise HardenError(
                f"head parameters do not fit together: projection {self.proj_weight.shape}, "
                f"bias {self.proj_bias.shape}, embeddings {self.embeddings.shape}"
            )
        if len(self.classes) != self.embeddings.shape[0]:
            raise HardenError(f"head has {self.embeddings.shape[0]} class rows but {len(self.classes)} class names")

    @property
    def in_features(self) -> int:
        return int(self.proj_weight.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Reference forward pass in float32 numpy, for parity checks and closed-form analysis."""
        z = features.astype(np.float32) @ self.proj_weight.T.astype(np.float32) + self.proj_bias.astype(np.float32)
        norm = np.maximum(np.linalg.norm(z, axis=1, keepdims=True), np.float32(self.eps))
        scale = np.float32(math.exp(min(self.logit_scale, LOGIT_SCALE_MAX)))
        return (scale * ((z / norm) @ self.embeddings.T.astype(np.float32))).astype(np.float32)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write head.npz atomically."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                proj_weight=self.proj_weight.astype(np.float32),
                proj_bias=self.proj_bias.astype(np.float32),
                embeddings=self.embeddings.astype(np.float32),
                logit_scale=np.float32(self.logit_scale),
                eps=np.float32(self.eps),
                classes=np.asarray(self.classes, dtype=str),
                embeddings_sha256=np.asarray(self.embeddings_sha256),
            )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadParams:
        """Read head.npz with a clear error for a missing, corrupt or incomplete file."""
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in HEAD_KEYS if k not in data]
                if missing:
                    raise HardenError(f"{path}: not a head.npz (missing {missing})")
                return cls(
                    proj_weight=data["proj_weight"],
                    proj_bias=data["proj_bias"],
                    embeddings=data["embeddings"],
                    logit_scale=float(data["logit_scale"]),
                    classes=[str(c) for c in data["classes"]],
                    embeddings_sha256=str(data["embeddings_sha256"]),
                    eps=float(data["eps"]),
                )
        except (OSError, ValueError, EOFError) as err:
            raise HardenError(f"{path}: cannot read head parameters ({err})") from err


def _torch_head_class() -> type:
    """Build the nn.Module lazily so importing this file does not import torch."""
    import torch
    from torch import nn

    class TextGuidedHead(nn.Module):
        """Projection → L2 normalise → cosine classifier from text embeddings → × exp(s)."""

        def __init__(self, in_features: int, embeddings: torch.Tensor | np.ndarray, init: str = "text",
                     generator: torch.Generator | None = None) -> None:
            super().__init__()
            emb = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
            if emb.ndim != 2:
                raise HardenError(f"embeddings must be C×E, got shape {tuple(emb.shape)}")
            num_classes, dim = emb.shape
            self.proj = nn.Linear(in_features, dim)
            if init == "text":
                weight = emb / emb.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
            elif init == "random":
                weight = torch.randn(num_classes, dim, generator=generator)
                weight = weight / weight.norm(dim=1, keepdim=True)
            else:
                raise HardenError(f"unknown head init {init!r}; use 'text' or 'random'")
            self.weight = nn.Parameter(weight.clone())
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
            self.register_buffer("eps", torch.tensor(NORM_EPS), persistent=False)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            # z / max(‖z‖, eps) is F.normalize's maths, written out so the ONNX export is
            # ReduceL2 → Max → Div: the same graph as the rewrite pass, which the exact
            # final-layer analysis recognises (F.normalize exports as Clip → Expand).
            z = self.proj(features)
            norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
            z = z / torch.maximum(norm, self.eps.to(z.dtype))
            return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp() * (z @ self.weight.t())

        def to_params(self, classes: list[str], embeddings_sha256: str = "") -> HeadParams:
            """Detach into the numpy exchange format written as head.npz."""
            return HeadParams(
                proj_weight=self.proj.weight.detach().cpu().numpy().copy(),
                proj_bias=self.proj.bias.detach().cpu().numpy().copy(),
                embeddings=self.weight.detach().cpu().numpy().copy(),
                logit_scale=float(self.logit_scale.detach().clamp(max=LOGIT_SCALE_MAX)),
                classes=list(classes),
                embeddings_sha256=embeddings_sha256,
            )

        @classmethod
        def from_params(cls, params: HeadParams) -> TextGuidedHead:
            head = cls(params.in_features, params.embeddings)
            with torch.no_grad():
                head.proj.weight.copy_(torch.from_numpy(params.proj_weight))
                head.proj.bias.copy_(torch.from_numpy(params.proj_bias))
                head.weight.copy_(torch.from_numpy(params.embeddings))
                head.logit_scale.fill_(params.logit_scale)
            return head

    return TextGuidedHead


_CLASS_CACHE: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`from harden.head import TextGuidedHead` builds the torch class on first use."""
    if name == "TextGuidedHead":
        if name not in _CLASS_CACHE:
            _CLASS_CACHE[name] = _torch_head_class()
        return _CLASS_CACHE[name]
    raise AttributeError(name)
