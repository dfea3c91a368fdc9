"""The one explicit list of graph passes, in the order `harden rewrite` applies them.

The text head goes first so that range bounds are profiled on the final graph,
head included.
"""

from __future__ import annotations

from harden.graph.range_clip import RangeClipPass
from harden.graph.text_head import TextHeadPass

PASSES: list[type] = [TextHeadPass, RangeClipPass]


def pass_names() -> list[str]:
    return [cls.name for cls in PASSES]
