"""`harden describe --classes SPEC -o descriptions.json`: class descriptions from an LLM or offline sources."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from harden.files import refuse_overwrite
from harden.text.describe import DEFAULT_MODEL, describe_vocabulary
from harden.text.questions import DEFAULT_QUESTIONS, load_questions
from harden.text.vocab import BUILTIN_PREFIX, VOCAB_HELP


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "describe", help="describe classes with an LLM (OpenAI-compatible), its cache, or offline fallbacks",
        description="Ask an OpenAI-compatible chat endpoint how each class looks, caching every answer. "
                    "The key is read from OPENAI_API_KEY and never written. --offline uses the cache, then "
                    "the project's built-in descriptions, then the CLIP template ensemble.")
    parser.add_argument("--classes", required=True, metavar="FILE|builtin:NAME", help=VOCAB_HELP)
    parser.add_argument("-o", "--output", required=True, help="descriptions.json to write")
    parser.add_argument("--questions", default=None, metavar="FILE",
                        help="questions, one per line with {} for the class (or a JSON list); default: the five "
                             "of Wasim et al.: " + "; ".join(DEFAULT_QUESTIONS))
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"chat model name (default {DEFAULT_MODEL})")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    parser.add_argument("-n", "--n-per-question", type=int, default=3, help="answers per question (default 3)")
    parser.add_argument("--cache-dir", default=None, help="answer cache (default $HARDEN_CACHE/descriptions or "
                                                          "~/.cache/harden/descriptions)")
    parser.add_argument("--offline", action="store_true", help="no requests: cache, built-in, then CLIP templates")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most (default 8)")
    parser.add_argument("--max-retries", type=int, default=4,
                        help="retries with backoff on 429, 5xx, timeouts (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: server's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for source in (args.classes, args.questions):
        if source and not source.startswith(BUILTIN_PREFIX):
            refuse_overwrite(source, args.output)
    questions = load_questions(args.questions) if args.questions else DEFAULT_QUESTIONS
    result = describe_vocabulary(
        args.classes, questions=questions, model=args.model, base_url=args.base_url,
        n_per_question=args.n_per_question, cache_dir=args.cache_dir, offline=args.offline,
        concurrency=args.concurrency, max_retries=args.max_retries, timeout_s=args.timeout,
        temperature=args.temperature, progress=sys.stderr.isatty(),
    )
    result.save(args.output)
    counts = Counter(result.sources.values())
    total = sum(len(d) for d in result.descriptions.values())
    by_source = ", ".join(f"{n} {source}" for source, n in sorted(counts.items()))
    print(f"{args.output}: {len(result.classes)} classes, {total} descriptions; sources: {by_source}")
    return 0
