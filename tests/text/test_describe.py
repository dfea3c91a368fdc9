"""describe_classes: LLM answers, the on-disk cache, offline fallbacks, concurrency, and the key's secrecy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from harden.errors import HardenError
from harden.text import describe_classes, describe_vocabulary, load_builtin_descriptions
from harden.text.cache import AnswerCache, CacheKey
from tests.text.chat_server import ChatServer, Reply, completion, user_prompt

KEY = "sk-harden-test-SECRET-0123456789"
Q2 = ["Describe what a(n) {} looks like", "How can you identify a(n) {}?"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def run(server_url: str | None, cache: Path, classes: list[str] | None = None, **kw: object):
    return describe_classes(classes or ["cat", "dog"], questions=Q2, model=kw.pop("model", "test-model"),
                            base_url=server_url, n_per_question=2, cache_dir=cache, max_retries=1, timeout_s=5,
                            **kw)  # type: ignore[arg-type]


def test_online_then_cached_rerun_makes_no_requests(tmp_path: Path) -> None:
    with ChatServer() as server:
        first = run(server.url, tmp_path / "cache")
        assert len(server.requests) == 2 * 2 * 2  # classes × questions × samples
        assert first.sources == {"cat": "llm", "dog": "llm"}
        assert first.model == "test-model"
        assert len(first.descriptions["cat"]) == 4
        assert all("cat" in t for t in first.descriptions["cat"])
        assert first.provenance["answers"]["cat"] == {"cached": 0, "fetched": 4, "unusable": 0}
        again = run(server.url, tmp_path / "cache")
        assert len(server.requests) == 8  # nothing new was asked
    assert again.sources == {"cat": "cache", "dog": "cache"}
    assert again.descriptions == first.descriptions
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 8


def test_cache_is_keyed_by_model_question_class_and_sample(tmp_path: Path) -> None:
    with ChatServer() as server:
        run(server.url, tmp_path / "cache")
        run(server.url, tmp_path / "cache", model="other-model")
        assert len(server.requests) == 16
    cache = AnswerCache(tmp_path / "cache")
    a = cache.get(CacheKey("test-model", Q2[0], "cat", 0))
    b = cache.get(CacheKey("test-model", Q2[0], "cat", 1))
    assert a and b and a != b
    assert cache.get(CacheKey("test-model", Q2[0], "cat", 2)) is None
    assert cache.get(CacheKey("test-model", Q2[0], "dog", 0)) != a


def test_offline_uses_cache_then_builtin_then_templates(tmp_path: Path) -> None:
    with ChatServer() as server:
        run(server.url, tmp_path / "cache", classes=["Bag"])
    result = describe_vocabulary("builtin:fashion-mnist", questions=Q2, model="test-model", n_per_question=2,
                                 cache_dir=tmp_path / "cache", offline=True)
    shipped = load_builtin_descriptions("fashion-mnist")
    assert shipped is not None
    assert result.sources["Bag"] == "cache"
    assert result.sources["Coat"] == "builtin" and result.descriptions["Coat"] == shipped.descriptions["Coat"]
    assert result.provenance["builtin"]["author"] == shipped.provenance["author"]
    plain = tmp_path / "classes.txt"
    plain.write_text("axolotl\nBag\n", encoding="utf-8")
    mixed = describe_vocabulary(str(plain), questions=Q2, model="test-model", n_per_question=2,
                                cache_dir=tmp_path / "cache", offline=True)
    assert mixed.sources == {"axolotl": "template", "Bag": "cache"}
    assert "a photo of a axolotl." in mixed.descriptions["axolotl"] and len(mixed.descriptions["axolotl"]) == 80
    assert mixed.model == "test-model"


def test_offline_builtin_fashion_mnist_is_the_shipped_text(tmp_path: Path) -> None:
    result = describe_vocabulary("builtin:fashion-mnist", offline=True, cache_dir=tmp_path / "empty")
    shipped = load_builtin_descriptions("fashion-mnist")
    assert shipped is not None
    assert result.classes == shipped.classes and result.descriptions == shipped.descriptions
    assert set(result.sources.values()) == {"builtin"} and result.model is None


def test_mnist_is_prompted_with_the_digit_name(tmp_path: Path) -> None:
    with ChatServer() as server:
        result = describe_vocabulary("builtin:mnist", questions=Q2[:1], n_per_question=1, base_url=server.url,
                                     cache_dir=tmp_path / "cache", max_retries=0)
    prompts = sorted(user_prompt(b) for b in server.requests)
    assert "Describe what a(n) handwritten digit seven looks like" in prompts
    assert result.classes[7] == "7" and "digit seven" in result.descriptions["7"][0]


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    with ChatServer(lambda i, body: Reply(delay_s=0.15)) as server:
        run(server.url, tmp_path / "cache", classes=["a1", "b2", "c3"], concurrency=3)
    assert len(server.requests) == 12
    assert 2 <= server.max_inflight <= 3


def test_unusable_answers_are_dropped_and_not_cached(tmp_path: Path) -> None:
    def behaviour(i: int, body: dict) -> Reply:
        if "identify" in user_prompt(body):
            return Reply(body={"choices": []})
        return Reply(body=completion(f"A visual answer number {i}."))

    with ChatServer(behaviour) as server:
        result = run(server.url, tmp_path / "cache")
    assert result.provenance["answers"]["cat"] == {"cached": 0, "fetched": 2, "unusable": 2}
    assert len(result.descriptions["cat"]) == 2
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4


def test_a_class_without_any_usable_answer_fails(tmp_path: Path) -> None:
    def behaviour(i: int, body: dict) -> Reply:
        return Reply(body=b"<html>oops</html>") if "dog" in user_prompt(body) else Reply()

    with ChatServer(behaviour) as server, pytest.raises(HardenError, match="no usable answer.*'dog'"):
        run(server.url, tmp_path / "cache")


def test_identical_answers_are_deduplicated(tmp_path: Path) -> None:
    with ChatServer(lambda i, body: Reply(body=completion("A four-legged animal with fur."))) as server:
        result = run(server.url, tmp_path / "cache")
    assert result.descriptions["cat"] == ["A four-legged animal with fur."]


def test_corrupt_cache_entry_is_refetched(tmp_path: Path) -> None:
    with ChatServer() as server:
        run(server.url, tmp_path / "cache", classes=["cat"])
        path = AnswerCache(tmp_path / "cache").path(CacheKey("test-model", Q2[0], "cat", 0))
        path.write_text("{trunc", encoding="utf-8")
        result = run(server.url, tmp_path / "cache", classes=["cat"])
        assert len(server.requests) == 5
    assert result.sources["cat"] == "llm"
    assert result.provenance["answers"]["cat"] == {"cached": 3, "fetched": 1, "unusable": 0}


def test_failing_endpoint_keeps_what_was_cached(tmp_path: Path) -> None:
    def behaviour(i: int, body: dict) -> Reply:
        return Reply(status=500, headers={"retry-after-ms": "1"}) if "dog" in user_prompt(body) else Reply()

    with ChatServer(behaviour) as server, pytest.raises(HardenError, match="HTTP 500"):
        run(server.url, tmp_path / "cache", concurrency=1)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 4  # cat's answers survive for the rerun


def test_the_key_is_in_no_file_or_log(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    with ChatServer() as server:
        result = run(server.url, tmp_path / "cache")
        assert server.headers[0]["authorization"] == f"Bearer {KEY}"  # it was used...
    result.save(tmp_path / "descriptions.json")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 9
    for path in written:  # ...and is written nowhere
        assert KEY.encode() not in path.read_bytes(), path
    out = capsys.readouterr()
    assert KEY not in caplog.text and KEY not in out.out and KEY not in out.err
    assert "SECRET" not in str(result.to_json())


@pytest.mark.parametrize(("classes", "kw", "message"), [
    ([], {}, "no classes"),
    (["cat", "cat"], {}, "duplicate"),
    (["cat"], {"n_per_question": 0}, "at least 1"),
    (["cat"], {"concurrency": 0}, "at least 1"),
    (["cat"], {"questions": ["no placeholder"]}, "exactly one"),
])
def test_bad_arguments(tmp_path: Path, classes: list[str], kw: dict, message: str) -> None:
    with pytest.raises(HardenError, match=message):
        describe_classes(classes, cache_dir=tmp_path, offline=True, **kw)  # type: ignore[arg-type]
