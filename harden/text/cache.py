"""On-disk cache of LLM answers, one small JSON file per (model, question, class, sample index).

LLM calls cost money and need a network; a cache makes reruns free and lets CI
and air-gapped machines rebuild descriptions offline. One file per answer,
written atomically, means concurrent workers and interrupted runs never corrupt
it, and an entry is either whole or absent. The endpoint's URL and key are not
part of the key and are never written: the same model behind another URL gives
the same kind of answers, and a cache must be shareable without leaking secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from harden.files import write_json

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """$HARDEN_CACHE/descriptions, else $XDG_CACHE_HOME/harden/descriptions (~/.cache by default)."""
    if env := os.environ.get("HARDEN_CACHE"):
        return Path(env) / "descriptions"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harden" / "descriptions"


@dataclass(frozen=True)
class CacheKey:
    """What determines an answer: the model, the question template, the class as prompted, the sample."""

    model: str
    question: str
    name: str
    index: int

    def digest(self) -> str:
        payload = json.dumps([CACHE_VERSION, self.model, self.question, self.name, self.index], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class AnswerCache:
    """Raw answers stored under `root/<2 hex>/<sha256>.json`, each file recording its own key."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, key: CacheKey) -> Path:
        digest = key.digest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, key: CacheKey) -> str | None:
        """The cached answer, or None when absent or unreadable (a bad entry is refetched, not trusted)."""
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict) or data.get("key") != [key.model, key.question, key.name, key.index]:
            return None
        answer = data.get("answer")
        return answer if isinstance(answer, str) else None

    def put(self, key: CacheKey, answer: str) -> None:
        write_json(self.path(key), {"key": [key.model, key.question, key.name, key.index], "answer": answer})
