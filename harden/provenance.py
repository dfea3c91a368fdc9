"""What every report and model records about how it was made.

A reliability number is only trustworthy if a reviewer can tell which code,
packages and inputs produced it, so this is collected in one place.
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

TRACKED_PACKAGES = (
    "harden",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnx-graphsurgeon",
    "torch",
    "torchvision",
    "open_clip_torch",
    "openai",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages whose behaviour affects results (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Package versions plus interpreter and platform, with a UTC timestamp."""
    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
