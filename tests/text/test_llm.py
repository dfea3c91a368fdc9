"""The chat-completions client against a real local HTTP server: retries, malformed replies, timeouts."""

from __future__ import annotations

import pytest

from harden.errors import HardenError
from harden.text.llm import EndpointSettings, UnusableAnswer, ask, clean_answer, make_client, redact_url
from tests.text.chat_server import ChatServer, Reply, completion, fast_retry

KEY = "sk-harden-test-SECRET-0123456789"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def ask_once(server: ChatServer, retries: int = 2, timeout_s: float = 5.0) -> str:
    settings = EndpointSettings(model="test-model", base_url=server.url, max_retries=retries, timeout_s=timeout_s)
    client = make_client(settings)
    try:
        return ask(client, settings, "Describe what a(n) cat looks like")
    finally:
        client.close()


def test_answer_sends_model_prompt_and_key() -> None:
    with ChatServer() as server:
        answer = ask_once(server)
    assert "Describe what a(n) cat looks like" in answer
    body = server.requests[0]
    assert body["model"] == "test-model"
    assert body["messages"][-1] == {"role": "user", "content": "Describe what a(n) cat looks like"}
    assert server.headers[0]["authorization"] == f"Bearer {KEY}"


def test_429_then_success_is_retried() -> None:
    with ChatServer(lambda i, body: fast_retry(429) if i == 0 else Reply(body=completion("A small furry cat."))) as srv:
        assert ask_once(srv) == "A small furry cat."
    assert len(srv.requests) == 2


def test_500s_until_retries_run_out() -> None:
    with ChatServer(lambda i, body: fast_retry(500)) as server:
        with pytest.raises(HardenError, match=r"HTTP 500 after 3 retries"):
            ask_once(server, retries=3)
    assert len(server.requests) == 4  # the first try and three retries, no more


def test_503_then_success() -> None:
    with ChatServer(lambda i, body: fast_retry(503) if i < 2 else Reply(body=completion("A tabby cat."))) as srv:
        assert ask_once(srv, retries=2) == "A tabby cat."
    assert len(srv.requests) == 3


def test_400_is_not_retried_and_the_key_is_scrubbed() -> None:
    echo_key = Reply(status=400, body={"error": {"message": f"bad request with key {KEY}"}})
    with ChatServer(lambda i, body: echo_key) as server:
        with pytest.raises(HardenError) as err:
            ask_once(server, retries=3)
    assert len(server.requests) == 1
    assert KEY not in str(err.value) and "HTTP 400" in str(err.value) and "***" in str(err.value)


def test_401_names_the_key_variable() -> None:
    with ChatServer(lambda i, body: Reply(status=401, body={"error": {"message": f"Incorrect key {KEY}"}})) as srv:
        with pytest.raises(HardenError, match="OPENAI_API_KEY") as err:
            ask_once(srv)
    assert KEY not in str(err.value)


@pytest.mark.parametrize("body", [
    b"this is not json",
    {"id": "x"},
    {"id": "x", "choices": []},
    [1, 2, 3],
    completion(None),
    completion(""),
    completion("   \n "),
    completion(["not", "text"]),
    completion("I'm sorry, but I can't help with that."),
])
def test_malformed_or_unusable_replies_are_refused(body: object) -> None:
    with ChatServer(lambda i, _: Reply(body=body)) as server:
        with pytest.raises(UnusableAnswer):
            ask_once(server)
    assert len(server.requests) == 1  # a reply arrived; it is refused, not retried as if the server failed


def test_timeout_then_success() -> None:
    def slow_first(i: int, body: dict) -> Reply:
        return Reply(delay_s=1.5) if i == 0 else Reply(body=completion("A cat on a sofa."))

    with ChatServer(slow_first) as server:
        assert ask_once(server, retries=1, timeout_s=0.4) == "A cat on a sofa."
    assert len(server.requests) == 2


def test_timeouts_until_retries_run_out() -> None:
    with ChatServer(lambda i, body: Reply(delay_s=1.0)) as server:
        with pytest.raises(HardenError, match=r"no reply within 0.3s, after 1 retries"):
            ask_once(server, retries=1, timeout_s=0.3)
    assert len(server.requests) == 2


def test_dead_endpoint() -> None:
    with ChatServer() as server:
        url = server.url
    settings = EndpointSettings(model="m", base_url=url, max_retries=0, timeout_s=2)
    with pytest.raises(HardenError, match="cannot connect"):
        ask(make_client(settings), settings, "Describe a cat")


def test_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(HardenError, match="OPENAI_API_KEY.*--offline"):
        make_client(EndpointSettings(model="m"))


@pytest.mark.parametrize(("raw", "clean"), [
    ("  A cat is\n a small   furry animal. ", "A cat is a small furry animal."),
    ('"A striped tabby cat."', "A striped tabby cat."),
    ("Answer: A cat with green eyes.", "A cat with green eyes."),
    ("1. Pointed ears.\n2. Long whiskers.", "Pointed ears. Long whiskers."),
    ("- Four legs\n- A tail", "Four legs A tail"),
])
def test_clean_answer(raw: str, clean: str) -> None:
    assert clean_answer(raw) == clean


def test_clean_answer_cuts_long_text_at_a_sentence() -> None:
    long = "A cat has fur. " * 60
    out = clean_answer(long)
    assert len(out) <= 400 and out.endswith("fur.")


@pytest.mark.parametrize("raw", ["", "ok", None, 3, "As an AI, I cannot see images."])
def test_clean_answer_refuses(raw: object) -> None:
    with pytest.raises(UnusableAnswer):
        clean_answer(raw)


def test_redact_url_drops_credentials() -> None:
    assert redact_url("https://user:pw@llm.internal:8443/v1?api_key=abc#x") == "https://llm.internal:8443/v1"
    assert redact_url(None) is None
