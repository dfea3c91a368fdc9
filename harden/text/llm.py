"""Asking an OpenAI-compatible chat-completions endpoint one question, and cleaning the answer.

Retries with exponential backoff on 408/409/429, 5xx, timeouts and dropped
connections are the `openai` client's own (`max_retries`, honouring Retry-After);
this module adds what the client does not: turning its errors into one-line
HardenErrors that never contain the API key, and refusing malformed or unusable
replies instead of embedding them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from harden.errors import HardenError

if TYPE_CHECKING:
    import openai

API_KEY_ENV = "OPENAI_API_KEY"
SYSTEM_PROMPT = (
    "You describe what things look like in photographs. "
    "Answer in one to three short, factual sentences about visual appearance."
)
MAX_ANSWER_CHARS = 400
MIN_ANSWER_CHARS = 8
_REFUSALS = re.compile(r"^(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|as an ai\b|i'?m unable|i am unable)",
                       re.IGNORECASE)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_LEAD_LABEL = re.compile(r"^(?:answer|description|caption)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class EndpointSettings:
    """Where and how to ask: model, optional base URL, the client's retry budget and timeout."""

    model: str
    base_url: str | None = None
    max_retries: int = 4
    timeout_s: float = 60.0
    temperature: float | None = None


class UnusableAnswer(Exception):
    """The endpoint replied, but not with a usable answer (malformed, empty, refusal); carries why."""


def redact_url(url: str | None) -> str | None:
    """The URL without user info, query or fragment, which may hold credentials; safe to record."""
    if url is None:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def api_key() -> str:
    """The key from OPENAI_API_KEY; it is sent to the endpoint and written nowhere."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise HardenError(f"set {API_KEY_ENV} to the endpoint's key (any non-empty value for a server without "
                          "authentication), or pass --offline to use cached or built-in descriptions")
    return key


def make_client(settings: EndpointSettings) -> openai.OpenAI:
    """An `openai.OpenAI` client for the settings; thread-safe, so workers share one."""
    import openai

    return openai.OpenAI(api_key=api_key(), base_url=settings.base_url, max_retries=settings.max_retries,
                         timeout=settings.timeout_s)


def scrub(text: str) -> str:
    """`text` with the API key masked, for error messages that may echo request details."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    return text.replace(key, "***") if key else text


def clean_answer(raw: Any) -> str:
    """One tidy line of description, or UnusableAnswer saying why the text is refused.

    Whitespace is collapsed, list markers, "Answer:" labels and wrapping quotes
    are removed, and long answers are cut at a sentence end within
    MAX_ANSWER_CHARS (text encoders truncate long input anyway, at 77 tokens for
    CLIP). Empty replies, refusals and fragments are refused.
    """
    if not isinstance(raw, str):
        raise UnusableAnswer(f"content is {type(raw).__name__}, not text")
    lines = [_LIST_MARKER.sub("", ln).strip() for ln in raw.splitlines()]
    text = " ".join(ln for ln in lines if ln)
    text = _LEAD_LABEL.sub("", " ".join(text.split()))
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”":
        text = text[1:-1].strip()
    if len(text) > MAX_ANSWER_CHARS:
        cut = text[:MAX_ANSWER_CHARS]
        end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
        text = cut[: end + 1] if end >= MIN_ANSWER_CHARS else cut.rsplit(" ", 1)[0]
    if len(text) < MIN_ANSWER_CHARS:
        raise UnusableAnswer(f"answer too short ({text!r})")
    if _REFUSALS.match(text):
        raise UnusableAnswer("the model declined to answer")
    return text


def _content(response: Any) -> Any:
    """The first choice's message content, or UnusableAnswer if the reply does not have one."""
    try:
        choice = response.choices[0]
        return choice.message.content
    except (AttributeError, IndexError, KeyError, TypeError) as err:
        raise UnusableAnswer(f"malformed reply ({type(err).__name__}: no choices[0].message.content)") from err


def ask(client: openai.OpenAI, settings: EndpointSettings, prompt: str) -> str:
    """The cleaned answer to `prompt`; UnusableAnswer for a bad reply, HardenError for a failing endpoint."""
    import openai

    kwargs: dict[str, Any] = {}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    where = redact_url(settings.base_url) or "the OpenAI API"
    tries = f"after {settings.max_retries} retries"
    try:
        response = client.chat.completions.create(
            model=settings.model,
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            **kwargs,
        )
    except openai.APIResponseValidationError as err:
        raise UnusableAnswer(f"malformed reply ({scrub(str(err))[:120]})") from err
    except openai.APITimeoutError as err:
        raise HardenError(f"{where}: no reply within {settings.timeout_s:g}s, {tries}") from err
    except openai.APIConnectionError as err:
        cause = err.__cause__ or err
        raise HardenError(f"{where}: cannot connect, {tries} ({scrub(str(cause))[:200]})") from err
    except openai.AuthenticationError as err:
        raise HardenError(f"{where}: the endpoint refused the key in {API_KEY_ENV} (HTTP 401)") from err
    except openai.RateLimitError as err:
        raise HardenError(f"{where}: still rate-limited (HTTP 429) {tries}; "
                          "lower --concurrency or retry later") from err
    except openai.NotFoundError as err:
        raise HardenError(f"{where}: HTTP 404 for model {settings.model!r}; check --model and --base-url "
                          "(which usually ends in /v1)") from err
    except openai.APIStatusError as err:
        kind = f"{tries}" if err.status_code >= 500 else "(not retried)"
        raise HardenError(f"{where}: HTTP {err.status_code} {kind}: {scrub(_message(err))[:200]}") from err
    except ValueError as err:  # a 2xx body that is not JSON
        raise UnusableAnswer(f"malformed reply ({scrub(str(err))[:120]})") from err
    return clean_answer(_content(response))


def _message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return str(getattr(err, "message", err))
