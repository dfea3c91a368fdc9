"""Class vocabularies: `builtin:NAME` or a text file, resolved to class names in label order.

A vocabulary file has one class per line, in label order. A line may add a tab
and a *prompt name*, the phrase put into questions and templates where the
class name alone reads badly ("0<TAB>handwritten digit zero"). Blank lines and
lines starting with '#' are skipped, so files can state their provenance.

Built-in vocabularies ship inside the package, in `harden/vocab/`: NAME.txt,
and for some NAME.descriptions.json, descriptions shipped with the project.
They are package data, so an installed wheel finds them as a checkout does.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harden.errors import HardenError
from harden.files import read_text

VOCAB_DIR = Path(__file__).resolve().parents[1] / "vocab"
BUILTIN_PREFIX = "builtin:"
VOCAB_HELP = "builtin:NAME (fashion-mnist, mnist, imagenet-1k) or a text file with one class name per line"


@dataclass(frozen=True)
class Vocabulary:
    """Class names in label order, the phrases used to prompt for them, and where they came from."""

    spec: str
    classes: list[str]
    prompt_names: list[str]
    builtin: str | None = None

    def prompt_name(self, cls: str) -> str:
        return self.prompt_names[self.classes.index(cls)]


def builtin_names() -> list[str]:
    """Names usable as `builtin:NAME`."""
    if not VOCAB_DIR.is_dir():
        return []
    return sorted(p.stem for p in VOCAB_DIR.glob("*.txt"))


def parse_vocabulary(text: str, origin: str) -> tuple[list[str], list[str]]:
    """Class names and prompt names from vocabulary text, refusing empty lists and duplicates."""
    classes: list[str] = []
    prompts: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, prompt = (part.strip() for part in raw.partition("\t"))
        if not name:
            raise HardenError(f"{origin}:{number}: empty class name")
        classes.append(name)
        prompts.append(prompt or name)
    if not classes:
        raise HardenError(f"{origin}: no class names (one per line expected)")
    dupes = sorted(name for name, count in Counter(classes).items() if count > 1)
    if dupes:
        raise HardenError(f"{origin}: duplicate class names {dupes}; names must be unique")
    return classes, prompts


def resolve_vocabulary(spec: str | os.PathLike[str]) -> Vocabulary:
    """`builtin:NAME` or a path to a vocabulary file, as a validated Vocabulary."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        path = VOCAB_DIR / f"{name}.txt"
        if not name or "/" in name or not path.is_file():
            known = ", ".join(BUILTIN_PREFIX + n for n in builtin_names()) or "none (harden/vocab is missing)"
            raise HardenError(f"unknown built-in vocabulary {spec!r}; available: {known}")
        classes, prompts = parse_vocabulary(path.read_text(encoding="utf-8"), spec)
        return Vocabulary(spec, classes, prompts, builtin=name)
    path = Path(spec)
    text = read_text(path, "classes", f" (or use {VOCAB_HELP})")
    classes, prompts = parse_vocabulary(text, str(path))
    return Vocabulary(spec, classes, prompts)


def resolve_classes(spec: str | os.PathLike[str]) -> list[str]:
    """Class names in label order for `builtin:NAME` or a classes file."""
    return resolve_vocabulary(spec).classes


def builtin_descriptions_path(name: str) -> Path | None:
    """The shipped descriptions for built-in vocabulary NAME, if the project ships any."""
    path = VOCAB_DIR / f"{name}.descriptions.json"
    return path if path.is_file() else None
