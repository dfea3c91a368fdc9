"""Dataset specs: real built-in sources load with correct counts; bad input is one clear error."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harden.data import fashion_mnist, load_dataset
from harden.data.specs import held_out_split
from harden.errors import HardenError

HAVE_FMNIST = all((fashion_mnist.DEBIAN_DIR / n).is_file() for pair in fashion_mnist.FILES.values() for n in pair)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_counts_and_labels() -> None:
    test = load_dataset("fashion-mnist:test")
    assert len(test) == 10_000 and test.image_shape == (1, 28, 28)
    assert set(test.class_counts().values()) == {1000}
    assert test.classes[9] == "Ankle boot"
    train = load_dataset("fashion-mnist:train", limit=500)
    assert len(train) == 500 and train.spec.endswith("@500")


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_train_split_has_60k() -> None:
    x = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    assert x.shape == (60_000,)


def test_mnist5k_and_digits() -> None:
    full = load_dataset("mnist5k")
    assert len(full) == 5000 and full.image_shape == (1, 28, 28)
    assert set(full.class_counts().values()) == {500}
    train, test = load_dataset("mnist5k:train"), load_dataset("mnist5k:test")
    assert len(train) + len(test) == 5000
    digits = load_dataset("digits")
    assert len(digits) == 1797 and digits.image_shape == (1, 8, 8)
    assert 0.0 <= digits.images.min() and digits.images.max() <= 1.0
    # The fixed split never leaks a test image into train.
    d_train, d_test = load_dataset("digits:train"), load_dataset("digits:test")
    seen = {row.tobytes() for row in d_train.images}
    assert len(d_train) + len(d_test) == 1797
    assert sum(row.tobytes() in seen for row in d_test.images) < 40  # digits has a few exact duplicates


def _write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(data[: len(data) - truncate])


def _fake_fmnist(root: Path, truncate: int = 0) -> None:
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 20), ("test", 10)):
        img, lab = fashion_mnist.FILES[part]
        _write_idx(folder / img, rng.integers(0, 256, (n, 28, 28)), truncate=truncate if part == "test" else 0)
        _write_idx(folder / lab, np.arange(n) % 10)


def test_harden_data_folder_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fmnist(tmp_path)
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    data = load_dataset("fashion-mnist")
    assert len(data) == 30 and data.labels[:3].tolist() == [0, 1, 2]


def test_truncated_idx_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_fmnist(tmp_path, truncate=7)
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    with pytest.raises(HardenError, match="expected .* bytes"):
        load_dataset("fashion-mnist:test")


def test_missing_fashion_mnist_lists_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.setenv("HARDEN_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HARDEN_DOWNLOAD", raising=False)
    with pytest.raises(HardenError, match="apt-get install dataset-fashion-mnist.*HARDEN_DATA.*HARDEN_DOWNLOAD"):
        load_dataset("fashion-mnist:test")


def test_npz_good_and_uint8(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.full((4, 3, 5, 5), 255, np.uint8), y=np.array([0, 1, 1, 0]), classes=np.array(["cat", "dog"]))
    data = load_dataset(f"npz:{path}")
    assert data.classes == ["cat", "dog"] and data.images.max() == 1.0 and data.images.dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 5, 5), np.float32), "y": np.zeros(4, int)}, "N×C×H×W"),
        ({"x": np.zeros((4, 2, 5, 5), np.float32), "y": np.zeros(4, int)}, "1 or 3 channels"),
        ({"x": np.zeros((4, 5, 5, 3), np.float32), "y": np.zeros(4, int)}, r"N×H×W×C: store x.transpose\(0, 3, 1, 2\)"),
        ({"x": np.zeros((4, 1, 5, 5), np.float32), "y": np.zeros(4, np.float32)}, "integer"),
        ({"x": np.zeros((4, 1, 5, 5), np.float32), "y": np.zeros(3, int)}, "labels of shape"),
        ({"x": np.zeros((4, 1, 5, 5), np.int32), "y": np.zeros(4, int)}, "float32 or uint8"),
        ({"images": np.zeros((4, 1, 5, 5), np.float32)}, "needs arrays"),
        ({"x": np.zeros((2, 1, 5, 5), np.float32), "y": np.array([0, -1])}, "negative labels"),
        ({"x": np.zeros((2, 1, 5, 5), np.float32), "y": np.array([0, 3]), "classes": np.array(["a", "b"])}, "labels span"),
    ],
)
def test_npz_wrong_shapes_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(HardenError, match=message):
        load_dataset(f"npz:{path}")


def test_corrupt_and_truncated_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 1, 5, 5), np.float32), y=np.zeros(4, int))
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    for path in (truncated, garbage):
        with pytest.raises(HardenError, match="not a readable"):
            load_dataset(f"npz:{path}")


def test_imagefolder(tmp_path: Path) -> None:
    for name, colour in (("apple", (255, 0, 0)), ("pear", (0, 255, 0))):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (6 + i, 6), colour).save(tmp_path / name / f"{i}.png")
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.classes == ["apple", "pear"] and len(data) == 6 and data.image_shape == (3, 6, 6)
    assert data.images[0, 0].mean() == pytest.approx(1.0) and data.images[3, 1].mean() == pytest.approx(1.0)
    assert any("resized" in note for note in data.notes)
    (tmp_path / "pear" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(HardenError, match="not a readable image"):
        load_dataset(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("cifar10", "unknown dataset"), ("mnist5k:valid", "unknown split"), ("npz:", "needs a path"),
     ("imagefolder:/no/such/dir", "not a folder"), ("npz:/no/such.npz", "no such file")],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(HardenError, match=message):
        load_dataset(spec)


def test_sample_is_seeded_and_ordered() -> None:
    a = load_dataset("digits", limit=50, seed=3)
    b = load_dataset("digits", limit=50, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert len(set(a.labels.tolist())) > 5  # a random subset, not the first 50 of one class
    with pytest.raises(HardenError):
        load_dataset("digits", limit=0)


@pytest.mark.parametrize("spec, expected", [
    ("fashion-mnist:train", "fashion-mnist:test"),
    ("digits:train", "digits:test"),
    ("mnist5k:train", "mnist5k:test"),
    ("digits", None),
    ("fashion-mnist:test", None),
    ("imagefolder:/data/train", None),   # a folder named train, not a split
    ("npz:train", None),
])
def test_held_out_split_only_for_builtin_sources(spec: str, expected: str | None) -> None:
    assert held_out_split(spec) == expected
