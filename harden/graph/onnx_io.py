"""Loading and saving ONNX models with one-line errors and atomic writes.

Every stage that reads a user's model goes through `load_model`, so a truncated
download or a file that is not ONNX gets the same clear message everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from harden.errors import HardenError
from harden.files import atomic_path, refuse_overwrite

# Weights above this size go to an external-data file beside the model, as the
# protobuf format cannot hold more than 2 GiB in one message.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, external data included, and run the checker on it."""
    path = Path(path)
    if not path.is_file():
        raise HardenError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, OSError, ValueError, RuntimeError) as err:
        raise HardenError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    if not model.graph.node:
        raise HardenError(f"{path}: not a readable ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid model"
        raise HardenError(f"{path}: ONNX checker rejected the model: {first}") from err
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], source: str | os.PathLike[str] | None = None,
               external_data: bool = False) -> None:
    """Check and write a model atomically; large models (or any, with `external_data`) keep their
    weights in `<name>.data`."""
    path = Path(path)
    if source is not None:
        refuse_overwrite(source, path)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as err:
        raise RuntimeError(f"produced an invalid ONNX model: {err}") from err
    if external_data or model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        _save_external(model, path)
        return
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Write model and `<name>.data` into a scratch folder beside `path`, then move both in."""
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(scratch / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        if (scratch / data_name).exists():  # absent when every tensor is under the threshold
            os.replace(scratch / data_name, path.parent / data_name)
        os.replace(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def uses_external_data(path: str | os.PathLike[str]) -> bool:
    """Whether the model file keeps any tensor outside itself (reads the graph, not the weights)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as err:
        raise HardenError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    return any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)


def get_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's `metadata_props` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: dict[str, Any]) -> None:
    """Set `metadata_props` entries in place; non-string values are stored as JSON."""
    current = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in current:
            current[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)
