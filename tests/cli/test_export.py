"""`harden export`: exit codes and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from harden.cli import main
from harden.train.finetune import finetune
from tests.train.tiny import tiny_config


def test_export_cli(tmp_path: Path, capsys) -> None:
    ckpt = finetune(tiny_config(tmp_path)).checkpoint
    out = tmp_path / "model.onnx"
    assert main(["export", ckpt, "-o", str(out), "--check-images", "16"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "model.head.npz" in printed
    assert (tmp_path / "model.head.npz").is_file()
    assert {p.key for p in onnx.load(str(out)).metadata_props} >= {
        "harden.classes", "harden.preprocess", "harden.head", "harden.provenance"}
    assert main(["export", ckpt, "-o", str(tmp_path / "m2.onnx"), "--json", "--data", "mnist5k:test"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_agreement"] == 1.0


def test_export_cli_errors(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    for argv in (["export", str(bad), "-o", str(tmp_path / "m.onnx")],
                 ["export", str(tmp_path / "none.pt"), "-o", str(tmp_path / "m.onnx")]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("harden export: error:") and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()
