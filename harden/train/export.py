"""`export_onnx(ckpt, out)`: a fine-tuned checkpoint as an ONNX model plus head.npz.

The graph takes `input` (N×C×H×W, already preprocessed as the metadata says) and
returns `logits` (N×C), with a dynamic batch dimension. It is exported with the
TorchScript exporter and constant folding, which ends the text head in the chain
Gemm(projection) → ReduceL2/Clip/Expand/Div (L2 normalise) → MatMul(Wᵀ) → Mul(exp s)
and the baseline in Flatten → Gemm: the shapes the graph passes look for.

Nothing is written until ONNX Runtime reproduces torch on real images (max |Δ| ≤
1e-4 on the logits and the same top-1 everywhere) and the numpy reference of the
head (`HeadParams.logits`) reproduces the torch head, so a file on disk is always
one that was checked.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harden import __version__
from harden.data import load_dataset
from harden.errors import HardenError
from harden.files import refuse_overwrite, sha256_file
from harden.provenance import package_versions

OPSET = 17
TOLERANCE = 1e-4
CHECK_IMAGES = 64
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class ExportResult:
    """What was written and how closely ONNX Runtime matched torch."""

    model: str
    head_params: str | None
    head: str
    opset: int
    classes: list[str]
    input_shape: list[int | str]
    images_checked: int
    max_abs_diff: float
    top1_agreement: float
    head_max_abs_diff: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportResult:
        return cls(**data)


def head_params_path(model_path: str | os.PathLike[str]) -> Path:
    """Where head.npz goes beside a model: `model.onnx` → `model.head.npz`."""
    return Path(model_path).with_suffix(".head.npz")


def export_onnx(ckpt_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                data: str | None = None, check_images: int = CHECK_IMAGES, opset: int = OPSET,
                tolerance: float = TOLERANCE) -> ExportResult:
    """Export, check against torch on real images, then write model.onnx (and model.head.npz).

    data: the dataset spec for the parity check (default: the checkpoint's eval set,
    else its training set).
    """
    import onnx
    import torch

    from harden.graph.onnx_io import get_metadata, save_model, set_metadata
    from harden.train.checkpoint import load_checkpoint

    if opset < 17:
        raise HardenError(f"--opset must be at least 17, got {opset}")
    refuse_overwrite(ckpt_path, out_path)
    ckpt = load_checkpoint(ckpt_path)
    net = ckpt.build()
    x = _check_inputs(ckpt, data, check_images)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    proto = _to_onnx(net, x[:2], opset)
    metadata = {
        "harden.classes": ckpt.classes,
        "harden.preprocess": ckpt.preprocess.to_json(),
        "harden.head": ckpt.model.head,
        "harden.provenance": {
            "version": __version__, "config": ckpt.config.to_dict(), "model": ckpt.model.to_dict(),
            "embeddings_sha256": ckpt.embeddings_sha256, "checkpoint_sha256": sha256_file(ckpt_path),
            "epochs": ckpt.epoch, "final_metrics": ckpt.metrics[-1].to_dict() if ckpt.metrics else None,
            "packages": package_versions(),
        },
    }
    set_metadata(proto, metadata)
    proto.producer_name, proto.producer_version = "harden", __version__
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise HardenError(f"the exported graph fails the ONNX checker: {str(err).splitlines()[0]}") from err
    diff, agreement = _ort_parity(proto, x, expected, tolerance)
    head_file, head_diff = None, None
    params = None
    if ckpt.model.head != "baseline":
        params = net.head.to_params(ckpt.classes, ckpt.embeddings_sha256)
        with torch.no_grad():
            feats = net.features(torch.from_numpy(x)).numpy()
        head_diff = float(np.max(np.abs(params.logits(feats) - expected)))
        if not head_diff <= tolerance:
            raise HardenError(f"head.npz reference logits differ from torch by {head_diff:.3g} > {tolerance}")
    save_model(proto, out_path, source=ckpt_path)
    if params is not None:
        head_file = head_params_path(out_path)
        params.save(head_file)
    return ExportResult(
        model=str(out_path), head_params=str(head_file) if head_file else None, head=ckpt.model.head,
        opset=opset, classes=list(ckpt.classes), input_shape=["batch", *map(int, x.shape[1:])],
        images_checked=len(x), max_abs_diff=diff, top1_agreement=agreement, head_max_abs_diff=head_diff,
        metadata=get_metadata(proto),
    )


def _check_inputs(ckpt: Any, data: str | None, count: int) -> np.ndarray:
    """Real preprocessed images for the parity check."""
    if count < 2:
        raise HardenError(f"the parity check needs at least 2 images, got {count}")
    spec = data or ckpt.eval_spec or ckpt.config.data
    images = load_dataset(spec, limit=count, seed=0)
    x = ckpt.preprocess.apply(images.images)
    want = (ckpt.model.in_channels, ckpt.model.image_size)
    if (x.shape[1], x.shape[2]) != want:
        raise HardenError(f"{spec}: preprocessed images are {x.shape[1:]}, the model takes "
                          f"{want[0]} channels at {want[1]} px")
    return x


def _to_onnx(net: Any, sample: np.ndarray, opset: int) -> Any:
    import onnx
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose (plain Gemm/MatMul graphs); silence its deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            net, (torch.from_numpy(sample),), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return _fold_constants(onnx.load_from_string(buffer.getvalue()))


def _fold_constants(proto: Any) -> Any:
    """Fold constant subgraphs (e.g. Clip → Exp of the logit scale) so the head ends in Mul(constant)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    folded = gs.export_onnx(graph)
    del folded.opset_import[:]
    folded.opset_import.extend(proto.opset_import)
    folded.ir_version = proto.ir_version
    return folded


def _ort_parity(proto: Any, x: np.ndarray, expected: np.ndarray, tolerance: float) -> tuple[float, float]:
    """Run ORT on the whole batch and on single images; refuse any numeric or top-1 mismatch."""
    from harden.graph.ort import make_session

    session = make_session(proto, opt_level="disable")
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    single = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0] for i in range(2)])
    if got.shape != expected.shape or single.shape != expected[:2].shape:
        raise HardenError(f"ONNX Runtime returned logits of shape {got.shape}, torch {expected.shape}")
    diff = float(max(np.max(np.abs(got - expected)), np.max(np.abs(single - expected[:2]))))
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    if not diff <= tolerance:
        raise HardenError(f"ONNX Runtime differs from torch by max |Δ| {diff:.3g} > {tolerance}; refusing to write")
    if agreement < 1.0:
        raise HardenError(f"ONNX Runtime changes the top-1 class on {100 * (1 - agreement):.1f}% of check images")
    return diff, agreement
