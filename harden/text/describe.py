"""Class descriptions from an LLM, its on-disk cache, shipped built-ins, or CLIP templates.

Online, every (question, class, sample) answer missing from the cache is asked
for with at most `concurrency` requests in flight, cached as it arrives, and a
failing endpoint stops the run with one HardenError (answers already cached stay
cached, so a rerun resumes). Offline, each class takes the first of: its cached
answers, the project's built-in descriptions, the CLIP template ensemble; the
output records which one each class got.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harden.errors import HardenError
from harden.provenance import environment
from harden.text.cache import AnswerCache, CacheKey, default_cache_dir
from harden.text.descriptions import Descriptions, load_descriptions
from harden.text.llm import EndpointSettings, UnusableAnswer, ask, clean_answer, make_client, redact_url
from harden.text.questions import DEFAULT_QUESTIONS, clip_templates, render, validate_questions
from harden.text.vocab import builtin_descriptions_path, resolve_vocabulary

DEFAULT_MODEL = "gpt-4o-mini"


@dataclass
class _ClassAnswers:
    """Answers gathered for one class, in (question, sample) order, with counts for provenance."""

    answers: dict[CacheKey, str]
    cached: int = 0
    fetched: int = 0
    unusable: int = 0


def _dedupe(texts: list[str]) -> list[str]:
    """Drop repeats (ignoring case), so a deterministic model does not weight one answer n times."""
    seen: set[str] = set()
    out = []
    for text in texts:
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


def load_builtin_descriptions(name: str) -> Descriptions | None:
    """The descriptions shipped for built-in vocabulary NAME (fashion-mnist, mnist), or None."""
    path = builtin_descriptions_path(name)
    return load_descriptions(path) if path else None


def _read_cache(cache: AnswerCache, keys: list[CacheKey]) -> dict[CacheKey, str]:
    found: dict[CacheKey, str] = {}
    for key in keys:
        raw = cache.get(key)
        if raw is None:
            continue
        try:
            found[key] = clean_answer(raw)
        except UnusableAnswer:
            continue
    return found


def _fetch(missing: list[CacheKey], settings: EndpointSettings, cache: AnswerCache, concurrency: int,
           progress: bool) -> tuple[dict[CacheKey, str], dict[CacheKey, str]]:
    """Ask for every missing key with bounded concurrency; (answers, reasons for unusable ones)."""
    client = make_client(settings)
    answers: dict[CacheKey, str] = {}
    unusable: dict[CacheKey, str] = {}

    def one(key: CacheKey) -> None:
        try:
            text = ask(client, settings, render(key.question, key.name))
        except UnusableAnswer as why:
            unusable[key] = str(why)
            return
        cache.put(key, text)
        answers[key] = text

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc="asking", unit="answer", leave=False)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="harden-llm")
    try:
        futures: list[Future[None]] = [pool.submit(one, key) for key in missing]
        if bar is not None:
            for future in futures:
                future.add_done_callback(lambda _f: bar.update(1))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        client.close()
    return answers, unusable


def describe_classes(
    classes: Sequence[str],
    questions: Sequence[str] = DEFAULT_QUESTIONS,
    model: str = DEFAULT_MODEL,
    base_url: str | None = None,
    n_per_question: int = 3,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
    concurrency: int = 8,
    *,
    prompt_names: Mapping[str, str] | None = None,
    builtin: Descriptions | None = None,
    max_retries: int = 4,
    timeout_s: float = 60.0,
    temperature: float | None = None,
    progress: bool = False,
    vocabulary: str | None = None,
) -> Descriptions:
    """Descriptions for `classes` (label order), asking `model` at `base_url` for what is not cached.

    `prompt_names` maps a class to the phrase put into questions (default: the
    name itself). `builtin` supplies offline fallbacks per class. The API key is
    read from OPENAI_API_KEY and never stored.
    """
    classes = list(classes)
    if not classes:
        raise HardenError("no classes to describe")
    if len(set(classes)) != len(classes):
        raise HardenError(f"duplicate class names {sorted({c for c in classes if classes.count(c) > 1})}")
    questions = validate_questions(list(questions))
    if n_per_question < 1:
        raise HardenError(f"--n-per-question must be at least 1, got {n_per_question}")
    if concurrency < 1:
        raise HardenError(f"--concurrency must be at least 1, got {concurrency}")
    if not model:
        raise HardenError("name the LLM with --model")
    names = {c: (prompt_names or {}).get(c, c) for c in classes}
    cache = AnswerCache(cache_dir if cache_dir is not None else default_cache_dir())
    keys = {c: [CacheKey(model, q, names[c], i) for q in questions for i in range(n_per_question)] for c in classes}
    found = _read_cache(cache, [k for ks in keys.values() for k in ks])
    per_class = {c: _ClassAnswers({k: found[k] for k in keys[c] if k in found}) for c in classes}
    for c in classes:
        per_class[c].cached = len(per_class[c].answers)
    settings = EndpointSettings(model, base_url, max_retries, timeout_s, temperature)
    unusable: dict[CacheKey, str] = {}
    if not offline:
        missing = [k for c in classes for k in keys[c] if k not in found]
        if missing:
            fetched, unusable = _fetch(missing, settings, cache, concurrency, progress)
            for c in classes:
                for k in keys[c]:
                    if k in fetched:
                        per_class[c].answers[k] = fetched[k]
                        per_class[c].fetched += 1
                    elif k in unusable:
                        per_class[c].unusable += 1
        empty = [c for c in classes if not per_class[c].answers]
        if empty:
            example = next((unusable[k] for k in keys[empty[0]] if k in unusable), "no answers")
            raise HardenError(f"the endpoint gave no usable answer for {len(empty)} class(es), e.g. {empty[0]!r} "
                              f"({example}); nothing written")

    descriptions: dict[str, list[str]] = {}
    sources: dict[str, str] = {}
    templates: list[str] | None = None
    for c in classes:
        got = per_class[c]
        if got.answers:
            descriptions[c] = _dedupe([got.answers[k] for k in keys[c] if k in got.answers])
            sources[c] = "llm" if got.fetched else "cache"
        elif builtin is not None and c in builtin.descriptions:
            descriptions[c] = list(builtin.descriptions[c])
            sources[c] = "builtin"
        else:
            templates = templates if templates is not None else clip_templates()
            descriptions[c] = [render(t, names[c]) for t in templates]
            sources[c] = "template"

    used = set(sources.values())
    provenance: dict[str, Any] = {
        "tool": "harden describe",
        "vocabulary": vocabulary,
        "offline": offline,
        "n_per_question": n_per_question,
        "base_url": None if offline else redact_url(base_url) or "default OpenAI API",
        "temperature": temperature,
        "system_prompt": None if used.isdisjoint({"llm", "cache"}) else "harden.text.llm.SYSTEM_PROMPT",
        "cache_dir": str(Path(cache.root).resolve()),
        "answers": {c: {"cached": per_class[c].cached, "fetched": per_class[c].fetched,
                        "unusable": per_class[c].unusable} for c in classes if sources[c] in ("llm", "cache")},
        "environment": environment(),
    }
    if "builtin" in used and builtin is not None:
        provenance["builtin"] = builtin.provenance
    if "template" in used:
        provenance["templates"] = "open_clip OPENAI_IMAGENET_TEMPLATES (the 80-prompt CLIP ImageNet ensemble)"
    if any(names[c] != c for c in classes):
        provenance["prompted_as"] = {c: names[c] for c in classes}
    return Descriptions(classes, questions, descriptions, sources,
                        model=model if used & {"llm", "cache"} else None, provenance=provenance)


def describe_vocabulary(spec: str, **kwargs: Any) -> Descriptions:
    """Resolve `builtin:NAME` or a classes file, then `describe_classes` with its prompt names and built-ins."""
    vocab = resolve_vocabulary(spec)
    builtin = load_builtin_descriptions(vocab.builtin) if vocab.builtin else None
    return describe_classes(vocab.classes, prompt_names=dict(zip(vocab.classes, vocab.prompt_names, strict=True)),
                            builtin=builtin, vocabulary=spec, **kwargs)
