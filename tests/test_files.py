"""Atomic outputs: nothing half-written survives an error, and inputs are never overwritten."""

from pathlib import Path

import pytest

from harden.errors import HardenError
from harden.files import atomic_open, read_text, refuse_overwrite, sha256_file, write_json


def test_error_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(dest) as handle:
            handle.write("partial")
            raise RuntimeError("crash mid-write")
    assert dest.read_text().startswith("{") and list(tmp_path.iterdir()) == [dest]


def test_refuse_overwrite_and_hash(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"abc")
    with pytest.raises(HardenError, match="overwrite"):
        refuse_overwrite(model, tmp_path / "." / "m.onnx")
    refuse_overwrite(model, tmp_path / "other.onnx")
    assert sha256_file(model) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_outputs_honour_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_read_text_names_the_file_and_why(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("é\n", encoding="utf-8")
    assert read_text(tmp_path / "q.txt", "questions") == "é\n"
    with pytest.raises(HardenError, match=r"missing\.txt: no such questions file \(hint\)$"):
        read_text(tmp_path / "missing.txt", "questions", " (hint)")
    with pytest.raises(HardenError, match="is a folder, not a questions file"):
        read_text(tmp_path, "questions")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(HardenError, match="cannot read questions"):
        read_text(tmp_path / "bad.txt", "questions")
