"""Notes the CLI prints on stderr about a model it has run: what a user must know to read its results."""

from __future__ import annotations

import sys

import onnx

from harden.fi.sites import batching_note


def note_batching(path: str) -> None:
    """Say on stderr when the model's images run one at a time, since its campaign is then slower than usual."""
    note = batching_note(onnx.load(path, load_external_data=False))
    if note:
        print(f"note: {path}: {note}", file=sys.stderr)
