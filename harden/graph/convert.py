"""`harden convert`: harden a model without its training code (the model-zoo path).

1. Cut the ONNX graph at the classifier's input and compute features (and the
   original scores) with ONNX Runtime.
2. Train a TextGuidedHead on those features in torch: on labels, or by
   distillation from the original scores.
3. Graft the head with the text-head pass, write the model and `NAME.head.npz`.
4. Measure original and hardened top-1 accuracy and their agreement on
   held-out images.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harden.data import Dataset, Preprocess, load_dataset
from harden.errors import HardenError
from harden.files import refuse_overwrite
from harden.graph.head_training import HeadTrainConfig, train_head
from harden.graph.model_input import PREPROCESS_KEY, model_classes, model_inputs, model_preprocess
from harden.graph.onnx_io import get_metadata, load_model, save_model, set_metadata, uses_external_data
from harden.graph.parallel import run_model
from harden.graph.rewrite import default_head_path
from harden.graph.text_head import TextHeadPass, feature_model

HOLDOUT_FRACTION = 0.2


@dataclass
class ConvertResult:
    """What `convert_model` measured and wrote; the CLI prints it, `--json` dumps it."""

    model: str
    output: str
    head: str
    classifier: str
    num_classes: int
    in_features: int
    embed_dim: int
    train_spec: str
    train_images: int
    eval_spec: str
    eval_images: int
    original_accuracy: float | None
    hardened_accuracy: float | None
    agreement: float
    final_loss: float
    parity_max_abs: float
    training: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertResult:
        return cls(**data)


def read_embeddings(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, str]:
    """embeddings.npz (from `harden embed`) → class names, C×E unit rows, the file's SHA-256."""
    from harden.text.embeddings import load_embeddings

    loaded = load_embeddings(path)
    return list(loaded.classes), np.asarray(loaded.matrix, dtype=np.float32), loaded.sha256


def align_embeddings(names: list[str] | None, emb_classes: list[str], matrix: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Rows in the model's class order, matched by name (exactly, else ignoring case and spaces)."""
    if names is None:
        return emb_classes, matrix
    for key in (lambda s: s, lambda s: " ".join(s.lower().replace("_", " ").split())):
        index = {key(c): i for i, c in enumerate(emb_classes)}
        if all(key(n) in index for n in names):
            return list(names), matrix[[index[key(n)] for n in names]]
    missing = [n for n in names if n not in emb_classes][:5]
    raise HardenError(f"the embeddings have no rows for the model's classes {missing}; embed the same class names "
                      f"(embeddings have {emb_classes[:5]}...)")


def convert_model(model_path: str | os.PathLike[str], data_spec: str, embeddings_path: str | os.PathLike[str],
                  out_path: str | os.PathLike[str], eval_spec: str | None = None, output: str | None = None,
                  preprocess: Preprocess | None = None, config: HeadTrainConfig | None = None,
                  limit: int | None = None, eval_limit: int | None = None,
                  head_path: str | os.PathLike[str] | None = None) -> ConvertResult:
    """Train a text-guided head on the model's own features and graft it; see the module docstring."""
    start = time.perf_counter()
    config = config or HeadTrainConfig()
    head_out = Path(head_path) if head_path else default_head_path(out_path)
    refuse_overwrite(model_path, out_path)
    external = uses_external_data(model_path)
    model = load_model(model_path)
    emb_classes, matrix, emb_sha = read_embeddings(embeddings_path)
    cut, features_name, scores_name, output_name = feature_model(model, output)
    prep = model_preprocess(model, preprocess)

    train, held_out = _split(load_dataset(data_spec, limit=limit, seed=config.seed), eval_spec, config.seed)
    evaluation = held_out if eval_spec is None else load_dataset(eval_spec, limit=eval_limit, seed=config.seed)
    # the same features, so the same head, on any machine (harden.graph.parallel)
    names = [features_name, scores_name, output_name]
    feats, scores, _ = run_model(cut, model_inputs(model, train, prep), names, "basic")
    num_classes = int(scores.reshape(len(scores), -1).shape[1])
    notes: list[str] = []
    if matrix.shape[0] != num_classes:
        raise HardenError(f"the model has {num_classes} classes but the embeddings have {matrix.shape[0]}: embed the "
                          "model's own classes in its label order (an ImageNet model's: harden describe --classes "
                          "builtin:imagenet-1k)")
    labelled = len(train.classes) == num_classes
    if not labelled and not config.distill:
        raise HardenError(f"{train.spec} has {len(train.classes)} classes but the model has {num_classes}; "
                          "use data with the model's classes, or --distill")
    declared = model_classes(model)
    if declared is not None and len(declared) != num_classes:
        raise HardenError(f"the model declares {len(declared)} classes in harden.classes but outputs {num_classes}")
    class_names = declared if declared is not None else (train.classes if labelled and train.named else None)
    classes, rows = align_embeddings(class_names, emb_classes, matrix)
    if not labelled:
        notes.append(f"{train.spec} has {len(train.classes)} classes, not the model's {num_classes}: "
                     "trained by distillation only, accuracy not measured")
    elif class_names is None:
        notes.append(f"neither {train.spec} nor the model names its classes: label i is taken to be the "
                     f"embeddings' class i ({', '.join(emb_classes[:3])}, …)")

    head, loss = train_head(feats, rows, classes, config, labels=train.labels if labelled else None,
                            teacher=scores, embeddings_sha256=emb_sha)
    graft = TextHeadPass(head, output=output_name, parity_seed=config.seed)
    hardened = graft.run(model)
    extra: dict[str, Any] = {"harden.convert": {"data": train.spec, "training": config.to_dict(),
                                                "embeddings": str(embeddings_path)}}
    metadata = get_metadata(model)
    if PREPROCESS_KEY not in metadata:
        extra[PREPROCESS_KEY] = prep.to_json()
    if "harden.classes" not in metadata:
        extra["harden.classes"] = classes
    set_metadata(hardened, extra)

    x_eval = model_inputs(model, evaluation, prep)
    (original,) = run_model(model, x_eval, [output_name], "basic")
    (graft_out,) = run_model(hardened, x_eval, [output_name], "basic")
    before = original.reshape(len(x_eval), -1).argmax(axis=1)
    after = graft_out.reshape(len(x_eval), -1).argmax(axis=1)
    eval_labelled = len(evaluation.classes) == num_classes
    save_model(hardened, out_path, source=model_path, external_data=external)
    head.save(head_out)
    return ConvertResult(
        model=str(model_path), output=str(out_path), head=str(head_out), classifier=graft.classifier,
        num_classes=num_classes, in_features=head.in_features, embed_dim=int(rows.shape[1]),
        train_spec=train.spec, train_images=len(train), eval_spec=evaluation.spec, eval_images=len(evaluation),
        original_accuracy=float(np.mean(before == evaluation.labels)) if eval_labelled else None,
        hardened_accuracy=float(np.mean(after == evaluation.labels)) if eval_labelled else None,
        agreement=float(np.mean(before == after)), final_loss=loss,
        parity_max_abs=float(graft.parity_max_abs or 0.0), training=config.to_dict(),
        seconds=round(time.perf_counter() - start, 2), notes=notes)


def _split(data: Dataset, eval_spec: str | None, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded fraction of `data` for evaluation when no separate set is given."""
    if eval_spec is not None:
        return data, data
    if len(data) < 10:
        raise HardenError(f"{data.spec}: {len(data)} images are too few to hold some out; give --eval SPEC")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(round(len(data) * HOLDOUT_FRACTION))
    return data.subset(np.sort(order[cut:]), "~train"), data.subset(np.sort(order[:cut]), "~heldout")
