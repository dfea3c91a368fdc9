"""`harden rewrite`: apply the graph passes to a model file and write the hardened copy.

The input file is read once and never written; the output (and `<name>.data`
when the input kept its weights outside the file) is written atomically after
every pass has run and passed its parity check, so an error leaves nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harden.data import Preprocess, load_dataset
from harden.errors import HardenError
from harden.files import refuse_overwrite
from harden.graph.model_input import model_inputs, model_preprocess
from harden.graph.onnx_io import load_model, save_model, uses_external_data
from harden.graph.range_clip import RangeClipPass
from harden.graph.registry import PASSES
from harden.graph.text_head import TextHeadPass
from harden.head import HeadParams


@dataclass
class PassReport:
    """One applied pass and the configuration it recorded in the model."""

    name: str
    config: dict[str, Any]


@dataclass
class RewriteResult:
    """What `rewrite_file` did, as printed by the CLI and stored as JSON."""

    input: str
    output: str
    passes: list[PassReport] = field(default_factory=list)
    external_data: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewriteResult:
        passes = [PassReport(**p) for p in data.get("passes", [])]
        return cls(**{**data, "passes": passes})


def rewrite_file(model_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                 head_path: str | os.PathLike[str] | None = None, output: str | None = None,
                 range_clip: bool = False, data_spec: str | None = None, limit: int = 512,
                 layers: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                 seed: int = 0) -> RewriteResult:
    """Apply the text-head pass (with `head_path`) and/or the range-clip pass (with `data_spec`)."""
    start = time.perf_counter()
    if head_path is None and not range_clip:
        raise HardenError("nothing to do: give --head head.npz and/or --range-clip --data SPEC")
    if range_clip and not data_spec:
        raise HardenError("--range-clip needs calibration data: --data SPEC")
    refuse_overwrite(model_path, out_path)
    external = uses_external_data(model_path)
    model = load_model(model_path)
    result = RewriteResult(input=str(model_path), output=str(out_path), external_data=external)
    passes: list[Any] = []
    if head_path is not None:
        passes.append(TextHeadPass(HeadParams.load(head_path), output=output, parity_seed=seed))
    if range_clip:
        data = load_dataset(str(data_spec), limit=limit, seed=seed)
        calibration = model_inputs(model, data, model_preprocess(model, preprocess))
        passes.append(RangeClipPass(calibration, layers=layers, calibration_spec=data.spec))
    order = {cls.name: i for i, cls in enumerate(PASSES)}
    for graph_pass in sorted(passes, key=lambda p: order[p.name]):
        reason = graph_pass.check(model)
        if reason:
            raise HardenError(f"{graph_pass.name}: {reason}")
        model = graph_pass.run(model)
        result.passes.append(PassReport(graph_pass.name, graph_pass.config()))
    save_model(model, out_path, source=model_path, external_data=external)
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def default_head_path(out_path: str | os.PathLike[str]) -> Path:
    """Where `harden convert` writes the head beside its output: `NAME.head.npz`."""
    out = Path(out_path)
    return out.with_name(out.stem + ".head.npz")
