"""Class vocabularies, questions files and the shipped descriptions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from harden.data.fashion_mnist import CLASSES as FASHION_CLASSES
from harden.errors import HardenError
from harden.text import DEFAULT_QUESTIONS, load_builtin_descriptions, resolve_classes, resolve_vocabulary
from harden.text.questions import load_questions, render


def test_builtin_fashion_mnist_matches_the_dataset_order() -> None:
    assert resolve_classes("builtin:fashion-mnist") == FASHION_CLASSES


def test_builtin_mnist_digits_with_prompt_names() -> None:
    vocab = resolve_vocabulary("builtin:mnist")
    assert vocab.classes == [str(d) for d in range(10)]
    assert vocab.prompt_name("3") == "handwritten digit three"


def test_builtin_imagenet_has_1000_unique_names_in_label_order() -> None:
    names = resolve_classes("builtin:imagenet-1k")
    assert len(names) == 1000 == len(set(names))
    assert names[0] == "tench" and names[1] == "goldfish" and names[999] == "toilet paper"
    assert names[744] == "projectile" and names[836] == "sunglass" and names[837] == "sunglasses"


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_shipped_descriptions_follow_the_default_questions(name: str) -> None:
    shipped = load_builtin_descriptions(name)
    assert shipped is not None
    assert shipped.classes == resolve_classes(f"builtin:{name}")
    assert shipped.questions == list(DEFAULT_QUESTIONS)
    assert set(shipped.sources.values()) == {"builtin"} and shipped.model is None
    assert "written by the harden project" in shipped.provenance["author"]
    for cls in shipped.classes:
        texts = shipped.descriptions[cls]
        assert len(texts) == 2 * len(DEFAULT_QUESTIONS) == len(set(texts))
        assert all(10 < len(t) < 200 for t in texts)


def test_imagenet_has_no_shipped_descriptions() -> None:
    assert load_builtin_descriptions("imagenet-1k") is None


def test_plain_file_with_comments_blank_lines_and_prompt_names(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\ncat\n\n  dog  \nbird\tsmall songbird\n", encoding="utf-8")
    vocab = resolve_vocabulary(path)
    assert vocab.classes == ["cat", "dog", "bird"]
    assert vocab.prompt_names == ["cat", "dog", "small songbird"]
    assert vocab.builtin is None


@pytest.mark.parametrize(("text", "message"), [
    ("", "no class names"),
    ("# only a comment\n\n", "no class names"),
    ("cat\ndog\ncat\n", r"duplicate class names \['cat'\]"),
    ("cat\n\tprompt only\n", "empty class name"),
])
def test_bad_class_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "classes.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(HardenError, match=message):
        resolve_classes(path)


def test_missing_file_and_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(HardenError, match="no such classes file"):
        resolve_classes(tmp_path / "nope.txt")
    with pytest.raises(HardenError, match="unknown built-in vocabulary.*builtin:fashion-mnist"):
        resolve_classes("builtin:cifar-7")
    with pytest.raises(HardenError, match="is a folder"):
        resolve_classes(tmp_path)


def test_default_questions_are_the_papers_five() -> None:
    assert DEFAULT_QUESTIONS == (
        "Describe what a(n) {} looks like",
        "How can you identify a(n) {}?",
        "What does a(n) {} look like?",
        "Describe an image from the internet of a(n) {}",
        "A caption of an image of a(n) {}:",
    )
    assert render(DEFAULT_QUESTIONS[1], "ankle {boot}") == "How can you identify a(n) ankle {boot}?"


def test_questions_file_text_and_json(tmp_path: Path) -> None:
    text = tmp_path / "q.txt"
    text.write_text("# mine\nWhat colour is a {}?\n\nSketch a {}.\n", encoding="utf-8")
    assert load_questions(text) == ["What colour is a {}?", "Sketch a {}."]
    js = tmp_path / "q.json"
    js.write_text(json.dumps(["Describe a {}."]), encoding="utf-8")
    assert load_questions(js) == ["Describe a {}."]


@pytest.mark.parametrize(("text", "message"), [
    ("Describe it.\n", "exactly one"),
    ("Compare a {} and a {}.\n", "exactly one"),
    ("A {}?\nA {}?\n", "duplicate"),
    ("# nothing\n", "no questions"),
    ('["ok {}", 3]', "list of strings"),
    ("[not json", "not valid JSON"),
])
def test_bad_questions_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "q.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(HardenError, match=message):
        load_questions(path)
    with pytest.raises(HardenError, match="no such questions file"):
        load_questions(tmp_path / "none.txt")


def test_an_installed_wheel_ships_the_builtin_vocabularies(tmp_path: Path) -> None:
    """Not only a checkout: a wheel built from the repository finds builtin: names and shipped descriptions."""
    pytest.importorskip("setuptools", minversion="68")  # pyproject's build requirement, used without isolation
    root, src = Path(__file__).resolve().parents[2], tmp_path / "src"
    # a clean copy: setuptools reuses a build/ folder, which could hold files from an older layout
    shutil.copytree(root / "harden", src / "harden", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path, capture_output=True)
    wheel = next((tmp_path / "dist").glob("harden-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # unpacking a pure wheel onto a path is what installing it does
        archive.extractall(tmp_path / "site")
    code = ("import harden, harden.text.vocab as v; print(harden.__file__); "
            "print(len(v.resolve_classes('builtin:imagenet-1k')), v.builtin_descriptions_path('fashion-mnist').name)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1:] == ["1000", "fashion-mnist.descriptions.json"]
