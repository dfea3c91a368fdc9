"""The questions put to the LLM about each class, and the CLIP template fallback.

The default questions are the five that Wasim et al. (NeurIPS 2023) took from
CuPL (Pratt et al., 2023): asking *how a class looks* yields visual descriptions,
which a text encoder places closer to images than the bare class name does. They
are kept verbatim, "a(n)" included, so cached answers stay comparable with runs of
the original code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from harden.errors import HardenError
from harden.files import read_text

PLACEHOLDER = "{}"

DEFAULT_QUESTIONS: tuple[str, ...] = (
    "Describe what a(n) {} looks like",
    "How can you identify a(n) {}?",
    "What does a(n) {} look like?",
    "Describe an image from the internet of a(n) {}",
    "A caption of an image of a(n) {}:",
)


def render(question: str, name: str) -> str:
    """The question with the class name in its one placeholder.

    `str.replace` rather than `str.format`, so braces inside class names are inert.
    """
    return question.replace(PLACEHOLDER, name)


def validate_questions(questions: list[str] | tuple[str, ...], origin: str = "questions") -> list[str]:
    """Refuse an empty list, duplicates, and questions without exactly one `{}` for the class."""
    cleaned = [q.strip() for q in questions]
    if not cleaned:
        raise HardenError(f"{origin}: no questions given")
    for q in cleaned:
        if q.count(PLACEHOLDER) != 1:
            raise HardenError(f"{origin}: question {q!r} must contain exactly one '{{}}' where the class name goes")
    dupes = sorted({q for q in cleaned if cleaned.count(q) > 1})
    if dupes:
        raise HardenError(f"{origin}: duplicate questions {dupes}")
    return cleaned


def load_questions(path: str | os.PathLike[str]) -> list[str]:
    """Questions from a file: a JSON list of strings, or text with one question per line.

    In text files, blank lines and lines starting with '#' are skipped.
    """
    path = Path(path)
    text = read_text(path, "questions")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise HardenError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, list) or not all(isinstance(q, str) for q in data):
            raise HardenError(f"{path}: a JSON questions file must be a list of strings")
        return validate_questions(data, str(path))
    lines = [ln.strip() for ln in text.splitlines()]
    return validate_questions([ln for ln in lines if ln and not ln.startswith("#")], str(path))


def clip_templates() -> list[str]:
    """The 80-prompt CLIP ImageNet ensemble ("a photo of a {}." and the like), from open_clip.

    Used when no LLM answer is available offline. Importing `open_clip` costs
    seconds (it loads torch), so unless it is already loaded, only its
    dependency-free `zero_shot_metadata.py` is executed, found through the
    installed package's location. Templates are rendered with the placeholder so
    they can be stored and audited like questions.
    """
    module = sys.modules.get("open_clip")
    if module is None:
        package = importlib.util.find_spec("open_clip")
        if package is None or not package.submodule_search_locations:
            raise HardenError("open_clip_torch is not installed; it supplies the CLIP templates (pip install "
                              "open_clip_torch)")
        path = Path(list(package.submodule_search_locations)[0]) / "zero_shot_metadata.py"
        spec = importlib.util.spec_from_file_location("harden_open_clip_zero_shot_metadata", path)
        if spec is None or spec.loader is None:
            raise HardenError(f"{path}: cannot load open_clip's zero-shot templates")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return [template(PLACEHOLDER) for template in module.OPENAI_IMAGENET_TEMPLATES]
