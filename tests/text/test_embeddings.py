"""Class embeddings: the mean-of-normalised maths, embeddings.npz, MiniLM and open_clip encoders."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from harden.errors import HardenError
from harden.files import sha256_file
from harden.text import Descriptions, embed_descriptions, load_builtin_descriptions, load_embeddings
from harden.text.embeddings import ClassEmbeddings, class_means
from harden.text.encoders import parse_encoder
from harden.text.similarity import plot_similarity, similarity_summary


def descriptions(texts: dict[str, list[str]]) -> Descriptions:
    return Descriptions(list(texts), ["Describe a(n) {}"], texts, {c: "llm" for c in texts}, model="m")


def test_class_means_normalise_average_renormalise() -> None:
    vectors = np.array([[3.0, 0.0], [0.0, 0.5], [0.0, 2.0]])
    out = class_means(vectors, [2, 1])
    # class 0: mean of (1, 0) and (0, 1) -> (0.5, 0.5) -> unit; the 3.0 norm does not outvote the 0.5
    np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]], rtol=1e-6)
    assert out.dtype == np.float32
    with pytest.raises(HardenError, match="zero"):
        class_means(np.array([[1.0, 0.0], [0.0, 0.0]]), [2])
    with pytest.raises(HardenError, match="cancel out"):
        class_means(np.array([[1.0, 0.0], [-1.0, 0.0]]), [2])


def test_minilm_related_descriptions_are_closer_than_unrelated() -> None:
    result = embed_descriptions(descriptions({
        "cat": ["A small furry pet with whiskers, pointed ears and a long tail.", "A house cat sleeping on a sofa."],
        "kitten": ["A young cat with soft fur and big eyes.", "A tiny kitten playing with yarn."],
        "invoice": ["A printed tax invoice with a table of amounts and totals.", "A bill listing prices and VAT."],
    }), "minilm")
    classes, matrix, encoder, sha = result
    assert classes == ["cat", "kitten", "invoice"] and encoder == "minilm" and len(sha) == 64
    assert matrix.shape == (3, 384) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    sims = matrix @ matrix.T
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[1, 2] + 0.3


def test_fashion_mnist_builtin_embeddings_group_footwear() -> None:
    shipped = load_builtin_descriptions("fashion-mnist")
    assert shipped is not None
    result = embed_descriptions(shipped, "minilm")
    idx = {c: i for i, c in enumerate(result.classes)}
    sims = result.matrix @ result.matrix.T
    assert sims[idx["Sneaker"], idx["Ankle boot"]] > sims[idx["Sneaker"], idx["Dress"]]
    assert sims[idx["Sandal"], idx["Sneaker"]] > sims[idx["Sandal"], idx["Pullover"]]
    assert result.source_sha256 == shipped.content_sha256()


def test_npz_round_trip_is_byte_reproducible(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(4, 8))
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    emb = ClassEmbeddings(["a", "b", "c", "d"], matrix.astype(np.float32), "minilm", "f" * 64)
    emb.save(tmp_path / "e1.npz")
    ClassEmbeddings(emb.classes, emb.matrix.copy(), "minilm", "f" * 64).save(tmp_path / "e2.npz")
    assert (tmp_path / "e1.npz").read_bytes() == (tmp_path / "e2.npz").read_bytes()
    loaded = load_embeddings(tmp_path / "e1.npz")
    assert loaded.sha256 == sha256_file(tmp_path / "e1.npz") == emb.sha256
    assert loaded.classes == emb.classes and loaded.encoder == "minilm" and loaded.source_sha256 == "f" * 64
    np.testing.assert_array_equal(loaded.matrix, emb.matrix)
    with np.load(tmp_path / "e1.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["classes", "embeddings", "encoder", "source_sha256"]


def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_embeddings_refuses_bad_files(tmp_path: Path) -> None:
    good = {"classes": np.array(["a", "b"]), "embeddings": np.eye(2, dtype=np.float32),
            "encoder": np.array("minilm"), "source_sha256": np.array("0" * 64)}
    cases = {
        "missing.npz": None,
        "junk.npz": b"not a zip at all",
        "truncated.npz": _write_npz(tmp_path / "full.npz", **good).read_bytes()[:200],
        "nokey.npz": {k: v for k, v in good.items() if k != "encoder"},
        "float64.npz": {**good, "embeddings": np.eye(2)},
        "shape.npz": {**good, "embeddings": np.eye(3, dtype=np.float32)},
        "notunit.npz": {**good, "embeddings": 2 * np.eye(2, dtype=np.float32)},
        "nan.npz": {**good, "embeddings": np.array([[1, 0], [np.nan, 0]], dtype=np.float32)},
        "dupes.npz": {**good, "classes": np.array(["a", "a"])},
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict):
            _write_npz(path, **content)
        with pytest.raises(HardenError, match=str(path)):
            load_embeddings(path)
    assert load_embeddings(tmp_path / "full.npz").classes == ["a", "b"]


def test_open_clip_random_weights_real_tokenizer(tmp_path: Path) -> None:
    long_text = "A very long description of a striped cat. " * 40  # past CLIP's 77 tokens: truncated, not an error
    texts = descriptions({"cat": ["A tabby cat.", long_text], "car": ["A red sports car."]})
    first = embed_descriptions(texts, "open_clip:ViT-S-32:none")
    assert first.encoder == "open_clip:ViT-S-32:none"
    assert first.matrix.shape == (2, 384) and first.matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first.matrix, axis=1), 1.0, atol=1e-5)
    assert first.sha256 == embed_descriptions(texts, "open_clip:ViT-S-32:NONE").sha256  # seeded: reproducible


def test_open_clip_checkpoint_file_is_loaded(tmp_path: Path) -> None:
    import open_clip
    import torch

    torch.manual_seed(123)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)
    texts = ["A tabby cat.", "A cat asleep.", "A red sports car."]
    with torch.no_grad():
        feats = model.encode_text(open_clip.get_tokenizer("ViT-S-32")(texts)).numpy().astype(np.float64)
    expected = class_means(feats, [2, 1])
    got = embed_descriptions(descriptions({"cat": texts[:2], "car": texts[2:]}), f"open_clip:ViT-S-32:{checkpoint}")
    np.testing.assert_allclose(got.matrix, expected, atol=1e-5)
    assert got.encoder == f"open_clip:ViT-S-32:{checkpoint.resolve()}"
    random = embed_descriptions(descriptions({"cat": texts[:2], "car": texts[2:]}), "open_clip:ViT-S-32:none")
    assert not np.allclose(random.matrix, expected, atol=1e-3)


def test_bad_open_clip_checkpoints(tmp_path: Path) -> None:
    import torch

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    texts = descriptions({"cat": ["A cat."]})
    for path in (junk, wrong):
        with pytest.raises(HardenError, match=f"{path}: not a usable open_clip checkpoint for ViT-S-32"):
            embed_descriptions(texts, f"open_clip:ViT-S-32:{path}")
    with pytest.raises(HardenError, match="no such open_clip checkpoint"):
        embed_descriptions(texts, f"open_clip:ViT-S-32:{tmp_path / 'absent.pt'}")


def test_open_clip_tag_without_local_weights_names_the_alternatives(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HARDEN_DOWNLOAD", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(HardenError) as err:
        embed_descriptions(descriptions({"cat": ["A cat."]}), "open_clip:RN50:openai")
    message = str(err.value)
    assert "not available offline" in message and "open_clip:RN50:/path/to/" in message and "minilm" in message
    assert "\n" not in message


@pytest.mark.parametrize(("encoder", "message"), [
    ("word2vec", "unknown encoder"),
    ("open_clip:ViT-Q-99", "unknown open_clip architecture"),
    ("open_clip:VIT-B-32", "did you mean ViT-B-32"),
    ("open_clip:ViT-S-32", "no pretrained tags"),
    ("open_clip:RN50:no-such-tag", "no pretrained tag 'no-such-tag'.*openai"),
])
def test_bad_encoder_ids(encoder: str, message: str) -> None:
    with pytest.raises(HardenError, match=message):
        parse_encoder(encoder)


def test_default_tag_and_canonical_ids() -> None:
    assert parse_encoder("open_clip:ViT-B-32").id == "open_clip:ViT-B-32:openai"
    assert parse_encoder(" minilm ").id == "minilm"
    assert parse_encoder("open_clip:ViT-S-32:none").random_weights


def test_similarity_summary_and_heatmap(tmp_path: Path) -> None:
    matrix = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    summary = similarity_summary(matrix, ["a", "b", "c"])
    assert summary.min_off_diagonal == pytest.approx(0.0)
    assert summary.max_off_diagonal == pytest.approx(0.8)
    assert summary.mean_off_diagonal == pytest.approx((0.8 + 0.0 + 0.6) / 3)
    assert summary.most_similar_pair == ("a", "b")
    assert similarity_summary(matrix[:1], ["a"]).mean_off_diagonal is None
    plot_similarity(matrix, ["a", "b", "c"], tmp_path / "s.png")
    many = np.eye(60, dtype=np.float32)
    plot_similarity(many, [f"c{i}" for i in range(60)], tmp_path / "many.png")
    for name in ("s.png", "many.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.png", "s.png"]  # no temporary files left


def test_npz_is_a_plain_zip_of_npy(tmp_path: Path) -> None:
    emb = ClassEmbeddings(["x"], np.array([[0.6, 0.8]], dtype=np.float32), "minilm", "")
    emb.save(tmp_path / "e.npz")
    with zipfile.ZipFile(tmp_path / "e.npz") as archive:
        assert [i.date_time for i in archive.infolist()] == [(1980, 1, 1, 0, 0, 0)] * 4
