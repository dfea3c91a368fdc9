"""`harden embed`: the offline demo path, printed separability, one-line errors, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harden.cli import main
from harden.data.fashion_mnist import CLASSES
from harden.files import sha256_file
from harden.text import load_embeddings


@pytest.fixture
def fashion_descriptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HARDEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "d.json"
    assert main(["describe", "--classes", "builtin:fashion-mnist", "--offline", "-o", str(out)]) == 0
    return out


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("harden embed: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_offline_demo_path(fashion_descriptions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    out = tmp_path / "e.npz"
    assert main(["embed", str(fashion_descriptions), "--encoder", "minilm", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 classes × 384 (minilm)" in printed
    assert "off-diagonal cosine: min" in printed and "mean" in printed
    classes, matrix, encoder, sha = load_embeddings(out)
    assert classes == CLASSES and matrix.shape == (10, 384) and matrix.dtype == np.float32
    assert encoder == "minilm" and sha == sha256_file(out) and sha[:16] in printed
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    off = (matrix @ matrix.T)[~np.eye(10, dtype=bool)]
    assert f"min {off.min():.3f}, mean {off.mean():.3f}" in printed
    heatmap = tmp_path / "e.similarity.png"
    assert heatmap.read_bytes()[:4] == b"\x89PNG"


def test_corrupt_descriptions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "truncated.json": '{"schema": "harden.descriptions/1", "classes": [',
        "wrong_schema.json": json.dumps({"schema": "other/1"}),
        "missing_class.json": json.dumps({"schema": "harden.descriptions/1", "classes": ["a", "b"],
                                          "questions": [], "descriptions": {"a": ["x"]},
                                          "sources": {"a": "llm"}, "model": None, "provenance": {}}),
        "bad_source.json": json.dumps({"schema": "harden.descriptions/1", "classes": ["a"], "questions": [],
                                       "descriptions": {"a": ["x"]}, "sources": {"a": "guess"}, "model": None,
                                       "provenance": {}}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        out = tmp_path / f"{name}.npz"
        assert main(["embed", str(path), "-o", str(out)]) == 1
        assert str(path) in one_line_error(capsys)
        assert not out.exists() and not (tmp_path / f"{name}.similarity.png").exists()
    assert main(["embed", str(tmp_path / "absent.json"), "-o", str(tmp_path / "x.npz")]) == 1
    assert "no such descriptions file" in one_line_error(capsys)


@pytest.mark.parametrize(("encoder", "message"), [
    ("bert", "unknown encoder"),
    ("open_clip:NoSuchNet", "unknown open_clip architecture"),
])
def test_bad_encoders(fashion_descriptions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      encoder: str, message: str) -> None:
    out = tmp_path / "e.npz"
    assert main(["embed", str(fashion_descriptions), "--encoder", encoder, "-o", str(out)]) == 1
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_bad_checkpoint(fashion_descriptions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "clip.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "e.npz"
    assert main(["embed", str(fashion_descriptions), "--encoder", f"open_clip:ViT-S-32:{bad}", "-o", str(out)]) == 1
    assert "not a usable open_clip checkpoint" in one_line_error(capsys)
    assert not out.exists()


def test_refuses_to_overwrite_its_input(fashion_descriptions: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = fashion_descriptions.read_bytes()
    assert main(["embed", str(fashion_descriptions), "-o", str(fashion_descriptions)]) == 1
    assert "refusing to overwrite" in one_line_error(capsys)
    assert fashion_descriptions.read_bytes() == before
