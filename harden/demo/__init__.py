"""`harden demo`: the paper's comparison end to end on offline data, in one call."""

from harden.demo.pipeline import DemoConfig, DemoResult, run_demo

__all__ = ["DemoConfig", "DemoResult", "run_demo"]
