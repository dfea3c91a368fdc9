"""ONNX export: ORT parity, metadata, dynamic batch, the head's op chain, head.npz, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from harden.data import Preprocess, load_dataset
from harden.errors import HardenError
from harden.head import HeadParams
from harden.train.checkpoint import load_checkpoint
from harden.train.export import ExportResult, export_onnx, head_params_path
from harden.train.finetune import finetune
from tests.train.tiny import tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {}
    for head in ("text", "baseline", "random"):
        config = tiny_config(root, name=f"{head}.pt", head=head)
        if head == "baseline":
            config = tiny_config(root, name=f"{head}.pt", head=head, embeddings=None)
        out[head] = Path(finetune(config).checkpoint)
    return out


@pytest.mark.parametrize("head", ["text", "baseline", "random"])
def test_export_matches_torch_and_records_metadata(checkpoints, tmp_path: Path, head: str) -> None:
    out = tmp_path / f"{head}.onnx"
    result = export_onnx(checkpoints[head], out)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0 and result.images_checked == 64
    assert ExportResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["harden.classes"]) == [str(d) for d in range(10)]
    assert Preprocess.from_json(meta["harden.preprocess"]) == load_checkpoint(checkpoints[head]).preprocess
    assert meta["harden.head"] == head
    prov = json.loads(meta["harden.provenance"])
    assert prov["config"]["head"] == head and "version" in prov
    assert prov["embeddings_sha256"] == load_checkpoint(checkpoints[head]).embeddings_sha256

    # independent check: ORT at an unseen batch size against the checkpoint's torch model
    ckpt = load_checkpoint(checkpoints[head])
    x = ckpt.preprocess.apply(load_dataset("digits:test", limit=5, seed=7).images)
    with torch.no_grad():
        want = ckpt.build()(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)

    nodes = model.graph.node
    if head == "baseline":
        assert nodes[-1].op_type == "Gemm" and result.head_params is None
        assert not head_params_path(out).exists()
    else:
        # Gemm(proj) → normalise → MatMul(Wᵀ) → Mul(exp s), with the scale folded to a constant
        assert [n.op_type for n in nodes[-2:]] == ["MatMul", "Mul"]
        assert any(n.op_type == "Gemm" for n in nodes) and any(n.op_type == "ReduceL2" for n in nodes)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        scale = [inits[i] for i in nodes[-1].input if i in inits]
        assert len(scale) == 1 and scale[0].size == 1
        params = HeadParams.load(result.head_params)
        assert Path(result.head_params) == head_params_path(out)
        assert float(scale[0]) == pytest.approx(np.exp(params.logit_scale), rel=1e-5)
        wt = [inits[i] for i in nodes[-2].input if i in inits][0]
        np.testing.assert_allclose(wt, params.embeddings.T, atol=1e-6)
        with torch.no_grad():
            feats = ckpt.build().features(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(params.logits(feats), want, atol=1e-4)


def test_export_refuses_a_corrupt_checkpoint(tmp_path: Path, checkpoints) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(HardenError, match="not a readable harden checkpoint"):
        export_onnx(bad, tmp_path / "m.onnx")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoints["text"].read_bytes()[:5000])
    with pytest.raises(HardenError):
        export_onnx(truncated, tmp_path / "m.onnx")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(HardenError, match="not a harden finetune checkpoint"):
        export_onnx(other, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_on_parity_failure_and_writes_nothing(tmp_path: Path, checkpoints) -> None:
    out = tmp_path / "m.onnx"
    with pytest.raises(HardenError, match="differs from torch"):
        export_onnx(checkpoints["text"], out, tolerance=-1.0)  # no export can pass a negative tolerance
    assert not out.exists() and not head_params_path(out).exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_its_input(checkpoints) -> None:
    with pytest.raises(HardenError, match="overwrite"):
        export_onnx(checkpoints["text"], checkpoints["text"])
