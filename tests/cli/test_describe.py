"""`harden describe`: outputs, exit codes, one-line errors, no partial output, no key on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harden.cli import main
from harden.data.fashion_mnist import CLASSES
from tests.text.chat_server import ChatServer, echo, fast_retry

KEY = "sk-harden-cli-SECRET-9876543210"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HARDEN_CACHE", str(tmp_path / "harden-cache"))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("harden describe: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_offline_builtin_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.json"
    assert main(["describe", "--classes", "builtin:fashion-mnist", "--offline", "-o", str(out)]) == 0
    assert "10 classes, 100 descriptions; sources: 10 builtin" in capsys.readouterr().out
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["schema"] == "harden.descriptions/1"
    assert data["classes"] == CLASSES
    assert set(data["sources"].values()) == {"builtin"} and data["model"] is None
    assert data["provenance"]["builtin"]["author"].startswith("written by the harden project")


def test_online_against_local_server_then_offline_from_cache(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n", encoding="utf-8")
    questions = tmp_path / "q.txt"
    questions.write_text("What does a {} look like?\n", encoding="utf-8")
    args = ["describe", "--classes", str(classes), "--questions", str(questions), "-n", "2", "--model", "tm"]
    with ChatServer(lambda i, body: fast_retry(429) if i == 0 else echo(i, body)) as server:
        assert main([*args, "--base-url", server.url, "-o", str(tmp_path / "d1.json")]) == 0
        assert len(server.requests) == 5  # one 429, then four answers
    assert "sources: 2 llm" in capsys.readouterr().out
    assert main([*args, "--offline", "-o", str(tmp_path / "d2.json")]) == 0
    assert "sources: 2 cache" in capsys.readouterr().out
    d1, d2 = (json.loads((tmp_path / n).read_text(encoding="utf-8")) for n in ("d1.json", "d2.json"))
    assert d1["descriptions"] == d2["descriptions"] and d2["model"] == "tm"
    assert d1["questions"] == ["What does a {} look like?"]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such classes file"),
    ("", "no class names"),
    ("cat\ndog\ncat\n", "duplicate class names"),
])
def test_bad_classes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                           message: str) -> None:
    classes = tmp_path / "classes.txt"
    if content is not None:
        classes.write_text(content, encoding="utf-8")
    out = tmp_path / "d.json"
    assert main(["describe", "--classes", str(classes), "--offline", "-o", str(out)]) == 1
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_dead_endpoint_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with ChatServer() as server:
        url = server.url  # closed when the block ends: nothing listens there now
    out = tmp_path / "d.json"
    rc = main(["describe", "--classes", "builtin:mnist", "--base-url", url, "--max-retries", "1",
               "--timeout", "2", "-o", str(out)])
    assert rc == 1
    err = one_line_error(capsys)
    assert "cannot connect" in err and KEY not in err
    assert not out.exists() and list(tmp_path.glob("*.json")) == []


def test_missing_key_points_to_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(["describe", "--classes", "builtin:mnist", "-o", str(tmp_path / "d.json")]) == 1
    assert "OPENAI_API_KEY" in one_line_error(capsys)


def test_bad_questions_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("No placeholder here\n", encoding="utf-8")
    assert main(["describe", "--classes", "builtin:mnist", "--offline", "--questions", str(questions),
                 "-o", str(tmp_path / "d.json")]) == 1
    assert "exactly one" in one_line_error(capsys)


def test_refuses_to_overwrite_the_classes_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\n", encoding="utf-8")
    assert main(["describe", "--classes", str(classes), "--offline", "-o", str(classes)]) == 1
    assert "refusing to overwrite" in one_line_error(capsys)
    assert classes.read_text(encoding="utf-8") == "cat\n"
