"""`harden convert` through the CLI: JSON result, files beside the output, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from harden.cli import main
from harden.data import load_dataset
from tests.graph.test_convert import write_embeddings
from tests.graph.tiny_models import tiny_classifier


def test_convert_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_classifier("conv-relu-gap", True), str(model))
    emb = write_embeddings(tmp_path / "e.npz", load_dataset("digits:test").classes)
    out = tmp_path / "sub" / "h.onnx"
    code = main(["convert", str(model), "--data", "digits:test", "--embeddings", str(emb), "-o", str(out),
                 "--steps", "40", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["classifier"].startswith("conv1x1-relu-gap") and result["eval_images"] == 72
    assert out.is_file() and (tmp_path / "sub" / "h.head.npz").is_file()
    assert result["training"]["steps"] == 40 and 0 <= result["agreement"] <= 1
    code = main(["convert", str(model), "--data", "digits:test", "--embeddings", str(emb), "-o",
                 str(tmp_path / "t.onnx"), "--steps", "40", "--distill", "--head-out", str(tmp_path / "x.npz")])
    assert code == 0
    text = capsys.readouterr().out
    assert "distilled" in text and "top-1 agreement" in text and (tmp_path / "x.npz").is_file()


def test_convert_cli_refuses_wrong_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_classifier("gemm-transB1", False), str(model))
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    code = main(["convert", str(model), "--data", "digits:test", "--embeddings", str(bad), "-o",
                 str(tmp_path / "o.onnx")])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "embeddings file" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
