"""convert_model on a tiny model and the digits dataset: training, grafting, measuring, refusing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from harden.data import load_dataset
from harden.errors import HardenError
from harden.graph.convert import convert_model, read_embeddings
from harden.graph.head_training import HeadTrainConfig
from harden.graph.onnx_io import get_metadata
from harden.head import HeadParams
from tests.graph.tiny_models import fit_gemm_classifier, tiny_classifier

FAST = HeadTrainConfig(steps=120, batch=128)


def write_embeddings(path: Path, classes: list[str], dim: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((len(classes), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    np.savez(path, classes=np.asarray(classes), embeddings=emb, encoder=np.asarray("test"),
             source_sha256=np.asarray("0" * 64))
    return path


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path]:
    model = tmp_path / "tiny.onnx"
    train = load_dataset("digits:train")
    onnx.save(fit_gemm_classifier(tiny_classifier("gemm-transB1", True), train.images, train.labels), str(model))
    classes = train.classes
    return model, write_embeddings(tmp_path / "emb.npz", list(reversed(classes)))


def test_convert_trains_grafts_and_measures(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, emb = setup
    out = tmp_path / "hard.onnx"
    result = convert_model(model, "digits:train", emb, out, eval_spec="digits:test", config=HeadTrainConfig())
    assert out.is_file() and Path(result.head) == tmp_path / "hard.head.npz"
    head = HeadParams.load(result.head)
    assert head.classes == [str(i) for i in range(10)], "embedding rows were not put in the model's class order"
    _, rows, sha = read_embeddings(emb)
    assert head.embeddings_sha256 == sha
    assert result.eval_images == 359 and result.train_images == 1438
    assert result.original_accuracy is not None and result.original_accuracy > 0.85
    assert result.hardened_accuracy is not None and result.hardened_accuracy > result.original_accuracy - 0.03
    assert result.agreement > 0.85 and result.parity_max_abs < 1e-4
    meta = get_metadata(onnx.load(str(out)))
    assert json.loads(meta["harden.classes"]) == head.classes
    assert json.loads(meta["harden.preprocess"])["channels"] == 1
    assert meta["harden.pass"] == "text-head" and json.loads(meta["harden.convert"])["data"] == "digits:train"
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_same_seed_gives_the_same_head(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, emb = setup
    heads = []
    for name in ("a", "b"):
        result = convert_model(model, "digits:test", emb, tmp_path / f"{name}.onnx",
                               config=HeadTrainConfig(steps=30, batch=64))
        heads.append(HeadParams.load(result.head))
    np.testing.assert_array_equal(heads[0].proj_weight, heads[1].proj_weight)
    np.testing.assert_array_equal(heads[0].embeddings, heads[1].embeddings)


def test_distillation_agrees_with_the_original(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, emb = setup
    config = HeadTrainConfig(steps=200, batch=128, distill=True)
    result = convert_model(model, "digits:train", emb, tmp_path / "d.onnx", eval_spec="digits:test", config=config)
    assert result.agreement > 0.85
    assert result.hardened_accuracy is not None and result.hardened_accuracy > 0.8


def test_class_count_mismatches_are_refused(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = setup
    nine = write_embeddings(tmp_path / "nine.npz", [str(i) for i in range(9)])
    out = tmp_path / "never.onnx"
    with pytest.raises(HardenError, match="10 classes but the embeddings have 9"):
        convert_model(model, "digits:test", nine, out, config=FAST)
    renamed = write_embeddings(tmp_path / "names.npz", [f"c{i}" for i in range(10)])
    with pytest.raises(HardenError, match="no rows for the model's classes"):
        convert_model(model, "digits:test", renamed, out, config=FAST)
    three = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(three, x=rng.random((30, 1, 8, 8)).astype(np.float32), y=np.arange(30) % 3)
    emb = write_embeddings(tmp_path / "e10.npz", [str(i) for i in range(10)])
    with pytest.raises(HardenError, match="3 classes but the model has 10"):
        convert_model(model, f"npz:{three}", emb, out, config=FAST)
    assert not out.exists() and not (tmp_path / "never.head.npz").exists()


def test_an_npz_without_class_names_takes_the_embeddings_order(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """An .npz with every label but no 'classes' array was refused: its placeholder names (class_0, …) matched
    no embedding row. The model's outputs and the labels are both class indices, so the embeddings' order is
    taken, as distillation does, and the result says so."""
    model, emb = setup
    digits = load_dataset("digits:test")
    data = tmp_path / "unnamed.npz"
    np.savez(data, x=digits.images, y=digits.labels)
    result = convert_model(model, f"npz:{data}", emb, tmp_path / "u.onnx", config=FAST)
    assert HeadParams.load(result.head).classes == read_embeddings(emb)[0]
    assert any("label i is taken to be the embeddings' class i" in note for note in result.notes)
    assert result.original_accuracy is not None
