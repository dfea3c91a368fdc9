"""descriptions.json: class descriptions in label order, with where each class's text came from.

Schema `harden.descriptions/1`:

    {"schema": "harden.descriptions/1",
     "classes": [names in label order],
     "questions": [questions with one "{}"],
     "descriptions": {class: [strings]},
     "sources": {class: "llm" | "cache" | "builtin" | "template"},
     "model": str | null,
     "provenance": {...}}

`embed` reads only this file, so it is validated strictly on load: a file that
does not fit is refused rather than embedded into a silently wrong head.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harden.errors import HardenError
from harden.files import read_text, write_json

SCHEMA = "harden.descriptions/1"
SOURCES = ("llm", "cache", "builtin", "template")


@dataclass
class Descriptions:
    """Descriptions per class, the questions that produced them, and each class's source."""

    classes: list[str]
    questions: list[str]
    descriptions: dict[str, list[str]]
    sources: dict[str, str]
    model: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate({"schema": SCHEMA, "classes": self.classes, "questions": self.questions,
                  "descriptions": self.descriptions, "sources": self.sources, "model": self.model,
                  "provenance": self.provenance}, "descriptions")

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "classes": list(self.classes),
            "questions": list(self.questions),
            "descriptions": {c: list(self.descriptions[c]) for c in self.classes},
            "sources": {c: self.sources[c] for c in self.classes},
            "model": self.model,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: Any, origin: str = "descriptions") -> Descriptions:
        validate(data, origin)
        return cls(
            classes=list(data["classes"]),
            questions=list(data["questions"]),
            descriptions={c: list(data["descriptions"][c]) for c in data["classes"]},
            sources={c: data["sources"][c] for c in data["classes"]},
            model=data["model"],
            provenance=dict(data["provenance"]),
        )

    def content_sha256(self) -> str:
        """Hash of what an encoder sees: classes in order and their descriptions.

        Provenance (timestamps, versions) is left out, so re-describing from the
        cache gives the same hash and the same embeddings file.
        """
        payload = json.dumps([[c, self.descriptions[c]] for c in self.classes], ensure_ascii=False,
                             separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(path, self.to_json())


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate(data: Any, origin: str) -> None:
    """Raise HardenError with the first way `data` departs from the schema."""
    if not isinstance(data, dict):
        raise HardenError(f"{origin}: not a descriptions object (expected a JSON object)")
    if data.get("schema") != SCHEMA:
        raise HardenError(f"{origin}: schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    missing = [k for k in ("classes", "questions", "descriptions", "sources", "model", "provenance") if k not in data]
    if missing:
        raise HardenError(f"{origin}: missing keys {missing}")
    classes = data["classes"]
    if not _is_str_list(classes) or not classes:
        raise HardenError(f"{origin}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise HardenError(f"{origin}: duplicate class names in 'classes'")
    if not _is_str_list(data["questions"]):
        raise HardenError(f"{origin}: 'questions' must be a list of strings")
    if data["model"] is not None and not isinstance(data["model"], str):
        raise HardenError(f"{origin}: 'model' must be a string or null")
    if not isinstance(data["provenance"], dict):
        raise HardenError(f"{origin}: 'provenance' must be an object")
    desc, sources = data["descriptions"], data["sources"]
    if not isinstance(desc, dict) or not isinstance(sources, dict):
        raise HardenError(f"{origin}: 'descriptions' and 'sources' must be objects keyed by class")
    extra = sorted((set(desc) | set(sources)) - set(classes))
    if extra:
        raise HardenError(f"{origin}: descriptions or sources for classes not in 'classes': {extra[:5]}")
    for c in classes:
        texts = desc.get(c)
        if not _is_str_list(texts) or not texts or not all(t.strip() for t in texts):
            raise HardenError(f"{origin}: class {c!r} needs a non-empty list of non-empty descriptions")
        if sources.get(c) not in SOURCES:
            raise HardenError(f"{origin}: class {c!r} has source {sources.get(c)!r}, expected one of {list(SOURCES)}")


def load_descriptions(path: str | os.PathLike[str]) -> Descriptions:
    """Read and validate a descriptions.json."""
    path = Path(path)
    text = read_text(path, "descriptions")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise HardenError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    return Descriptions.from_json(data, str(path))
