"""Every registered pass follows DESIGN convention 2."""

from __future__ import annotations

import inspect

from harden.graph.registry import PASSES, pass_names


def test_passes_are_listed_in_application_order_with_their_contract() -> None:
    assert pass_names() == ["text-head", "range-clip"]
    for cls in PASSES:
        assert cls.__doc__ and inspect.getmodule(cls).__doc__, f"{cls.__name__} lacks the docstring with its maths"
        for method in ("check", "run", "config"):
            assert callable(getattr(cls, method)), f"{cls.__name__}.{method} missing"
