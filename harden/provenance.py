"""What every report and model records about how it was made.

A reliability number is only trustworthy if a reviewer can tell which code,
packages and inputs produced it, so this is collected in one place.
"""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
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


def cpu() -> str:
    """The processor's model name: ONNX Runtime picks its kernels by it, and an int8 model's integer arithmetic
    differs between them (harden.fi.integer_kernel), so a number measured on one CPU may not hold on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the platform's own name, which is coarser
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Package versions plus interpreter, platform and CPU, with a UTC timestamp."""
    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
