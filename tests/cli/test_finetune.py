"""`harden finetune`: exit codes, one-line errors, resume from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from harden.cli import main
from harden.train.checkpoint import load_checkpoint
from tests.train.tiny import write_embeddings

TINY = ["--arch", "tinyresnet", "--data", "digits:train", "--limit", "96", "--eval-limit", "48",
        "--batch-size", "48", "--threads", "2", "--no-progress"]


def test_finetune_text_then_resume(tmp_path: Path, capsys) -> None:
    emb = write_embeddings(tmp_path / "emb.npz")
    out = tmp_path / "ckpt.pt"
    assert main(["finetune", *TINY, "--embeddings", str(emb), "--epochs", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and f"wrote {out}" in printed
    assert main(["finetune", "--resume", str(out), "--epochs", "2", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["epoch"] for m in result["metrics"]] == [1, 2]
    assert load_checkpoint(out).epoch == 2


def test_a_stalled_run_warns_on_stderr_and_keeps_json_clean(tmp_path: Path, capsys) -> None:
    emb = write_embeddings(tmp_path / "emb.npz")
    out = tmp_path / "stalled.pt"
    assert main(["finetune", *TINY, "--embeddings", str(emb), "--epochs", "1", "--lr", "1e-9", "--json",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["metrics"][0]["epoch"] == 1
    assert captured.err.startswith("warning: training accuracy ended at") and "--optimizer adamw" in captured.err


def test_finetune_baseline_without_embeddings(tmp_path: Path, capsys) -> None:
    out = tmp_path / "base.pt"
    assert main(["finetune", *TINY, "--head", "baseline", "--epochs", "1", "--optimizer", "adamw",
                 "--label-smoothing", "0.1", "-o", str(out)]) == 0
    assert load_checkpoint(out).model.head == "baseline"


def test_finetune_errors_exit_1_with_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.pt"
    cases = [
        ["finetune", *TINY, "--epochs", "1", "-o", str(out)],  # text head without embeddings
        ["finetune", "--data", "digits:train", "-o", str(out)],  # no --arch
        ["finetune", *TINY, "--head", "baseline", "--epochs", "0", "-o", str(out)],
        ["finetune", "--resume", str(tmp_path / "missing.pt")],
        ["finetune", *TINY[:2], "--data", "nosuchdata:train", "--head", "baseline", "-o", str(out)],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("harden finetune: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists()
