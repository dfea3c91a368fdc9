"""Notes the CLI prints on stderr about a model it has run: what a user must know to read its results."""

from __future__ import annotations

import sys

import onnx

from harden.fi.integer_kernel import kernel_note
from harden.fi.sites import batching_note


def note_model(path: str) -> None:
    """Say on stderr, one line each, when the model's images run one at a time (its campaign is then slower than
    usual), and when its integer arithmetic on this CPU differs from other CPUs'."""
    model = onnx.load(path, load_external_data=False)
    for note in (batching_note(model), kernel_note(model)):
        if note:
            print(f"note: {path}: {note}", file=sys.stderr)
