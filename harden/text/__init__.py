"""Class vocabulary: descriptions from an LLM (or offline sources) and their text embeddings.

Public entry points (torch, open_clip and openai are imported only when used):

- `resolve_classes(spec)` / `resolve_vocabulary(spec)`: `builtin:NAME` or a classes file.
- `describe_classes(classes, ...)` / `describe_vocabulary(spec, ...)` -> `Descriptions`.
- `load_descriptions(path)`, `load_builtin_descriptions(name)`.
- `embed_descriptions(descriptions, encoder_id)` -> `ClassEmbeddings`; `load_embeddings(path)`.
"""

from harden.text.describe import describe_classes, describe_vocabulary, load_builtin_descriptions
from harden.text.descriptions import Descriptions, load_descriptions
from harden.text.embeddings import ClassEmbeddings, embed_descriptions, load_embeddings
from harden.text.questions import DEFAULT_QUESTIONS
from harden.text.vocab import Vocabulary, resolve_classes, resolve_vocabulary

__all__ = [
    "DEFAULT_QUESTIONS",
    "ClassEmbeddings",
    "Descriptions",
    "Vocabulary",
    "describe_classes",
    "describe_vocabulary",
    "embed_descriptions",
    "load_builtin_descriptions",
    "load_descriptions",
    "load_embeddings",
    "resolve_classes",
    "resolve_vocabulary",
]
