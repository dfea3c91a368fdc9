"""`harden rewrite`: end to end through the CLI, errors as one line, inputs never touched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from harden.cli import main
from harden.files import sha256_file
from harden.graph.locate import locate_classifier
from harden.graph.onnx_io import get_metadata
from harden.graph.ort import make_session
from tests.graph.tiny_models import random_head_npz_params, tiny_classifier


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny_classifier("gemm-transB1", True)
    info = locate_classifier(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    head = tmp_path / "head.npz"
    random_head_npz_params(info.in_features, info.num_classes).save(head)
    return path, head


def test_head_and_range_clip_in_one_run(files: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, head = files
    digest = sha256_file(model)
    out = tmp_path / "hard.onnx"
    code = main(["rewrite", str(model), "--head", str(head), "--range-clip", "--data", "digits:test",
                 "--limit", "64", "-o", str(out), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in result["passes"]] == ["text-head", "range-clip"]
    assert sha256_file(model) == digest
    hardened = onnx.load(str(out))
    history = json.loads(get_metadata(hardened)["harden.passes"])
    assert [h["pass"] for h in history] == ["text-head", "range-clip"]
    assert "harden/text_head/z" in result["passes"][1]["config"]["ranges"]


def test_text_output(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, head = files
    assert main(["rewrite", str(model), "--head", str(head), "-o", str(tmp_path / "h.onnx")]) == 0
    text = capsys.readouterr().out
    assert "gemm classifier 256→10" in text and "parity" in text


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to do"),
    (["--range-clip"], "--data"),
    (["--head", "HEAD", "--output", "nope"], "not an output"),
    (["--head", "HEAD", "--preprocess", "colour=3"], "--preprocess: cannot read 'colour=3'"),
])
def test_errors_are_one_line_and_write_nothing(files: tuple[Path, Path], tmp_path: Path, argv: list[str],
                                               message: str, capsys: pytest.CaptureFixture[str]) -> None:
    model, head = files
    out = tmp_path / "never.onnx"
    argv = [str(head) if a == "HEAD" else a for a in argv]
    assert main(["rewrite", str(model), "-o", str(out), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.npz", "model.onnx"], "a temporary file was left"


def test_refuses_to_overwrite_the_input(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, head = files
    digest = sha256_file(model)
    assert main(["rewrite", str(model), "--head", str(head), "-o", str(model)]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert sha256_file(model) == digest


def test_mismatched_head_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(tiny_classifier("conv1x1", False), str(model))
    head = tmp_path / "head.npz"
    random_head_npz_params(7, 10).save(head)
    assert main(["rewrite", str(model), "--head", str(head), "-o", str(tmp_path / "o.onnx")]) == 1
    assert "projects 7 features" in capsys.readouterr().err


def test_external_data_in_and_out(tmp_path: Path) -> None:
    model = tiny_classifier("matmul-add", False)
    info = locate_classifier(model)
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    digests = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    head = tmp_path / "head.npz"
    random_head_npz_params(info.in_features, info.num_classes).save(head)
    out_dir = tmp_path / "out"
    out = out_dir / "hard.onnx"
    assert main(["rewrite", str(src), "--head", str(head), "-o", str(out)]) == 0
    assert {p.name: sha256_file(tmp_path / p.name) for p in tmp_path.iterdir() if p.name in digests} == digests
    assert sorted(p.name for p in out_dir.iterdir()) == ["hard.onnx", "hard.onnx.data"]
    loaded = onnx.load(str(out))
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    (scores,) = make_session(loaded).run(None, {"x": x})
    assert scores.shape == (2, 10) and np.isfinite(scores).all()


def test_external_data_with_only_small_tensors(tmp_path: Path) -> None:
    """Every tensor under the 1 KiB threshold: no data file to move (a FileNotFoundError traceback before)."""
    from tests.fi.tiny_models import labelled_inputs, residual_cnn

    model = residual_cnn()
    x, y = labelled_inputs(model, 16)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    src = tmp_path / "ext.onnx"
    onnx.save(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights",
              size_threshold=0)
    out = tmp_path / "out" / "clip.onnx"
    assert main(["rewrite", str(src), "--range-clip", "--data", f"npz:{tmp_path / 'd.npz'}", "--preprocess",
                 "identity", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.onnx"]
    (scores,) = make_session(onnx.load(str(out))).run(None, {"x": x})
    np.testing.assert_array_equal(scores.argmax(axis=1), y)
