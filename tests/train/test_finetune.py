"""The fine-tune loop: it learns, freezes what it should, records, resumes exactly, and refuses bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harden.data import load_dataset
from harden.errors import HardenError
from harden.files import sha256_file
from harden.train.backbones import build_model
from harden.train.checkpoint import load_checkpoint
from harden.train.embeddings import load_aligned_embeddings
from harden.train.config import FinetuneResult
from harden.train.finetune import finetune, resume_config
from harden.train.loop import lr_at
from tests.train.tiny import tiny_config, write_embeddings


def _initial_model(config):
    emb, _ = load_aligned_embeddings(config.embeddings, [str(d) for d in range(10)])
    return build_model(config.arch, 10, config.head, emb, in_channels=1, seed=config.seed)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_head_really_freezes(tmp_path: Path, freeze: bool) -> None:
    config = tiny_config(tmp_path, freeze_head=freeze)
    before = _initial_model(config).state_dict()
    finetune(config)
    after = load_checkpoint(config.output).state_dict
    head_keys = [k for k in before if k.startswith("head.")]
    assert set(head_keys) == {"head.weight", "head.logit_scale", "head.proj.weight", "head.proj.bias"}
    head_same = all(torch.equal(before[k], after[k]) for k in head_keys)
    assert head_same == freeze
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])  # the backbone trains


def test_checkpoint_records_the_run(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=2)
    result = finetune(config)
    ckpt = load_checkpoint(config.output)
    assert ckpt.epoch == 2 and [m.epoch for m in ckpt.metrics] == [1, 2]
    assert ckpt.config == config and ckpt.data_spec == "digits:train@96" and ckpt.eval_spec == "digits:test"
    assert ckpt.classes == [str(d) for d in range(10)]
    assert ckpt.embeddings_sha256 == sha256_file(config.embeddings)
    assert ckpt.preprocess.channels == 1 and ckpt.preprocess.size == 8 and 0.0 < ckpt.preprocess.mean[0] < 1.0
    assert ckpt.model.head == "text" and ckpt.model.embedding_dim == 16
    assert all(m.eval_acc is not None and 0.0 <= m.eval_acc <= 1.0 for m in ckpt.metrics)
    assert ckpt.metrics[-1].logit_scale is not None
    assert result.metrics == ckpt.metrics and "torch" in ckpt.provenance["packages"]
    assert FinetuneResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_training_learns(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, head="baseline", epochs=3, limit=300, batch_size=50, eval_limit=200, lr=0.1)
    result = finetune(config)
    assert result.metrics[-1].train_loss < 0.5 * result.metrics[0].train_loss
    assert result.final_eval_acc is not None and result.final_eval_acc > 0.5  # chance is 0.1


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = tiny_config(tmp_path, name="straight.pt", epochs=2, augment=True)
    finetune(straight)

    partial = tiny_config(tmp_path, name="run.pt", epochs=2, augment=True)
    snapshot = tmp_path / "after_epoch1.pt"

    def stop_after_first(metrics) -> None:
        if metrics.epoch == 1:
            shutil.copy(partial.output, snapshot)
            raise KeyboardInterrupt  # the run is killed after its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        finetune(partial, on_epoch=stop_after_first)
    assert load_checkpoint(snapshot).epoch == 1
    resumed = finetune(resume_config(str(snapshot), output=str(tmp_path / "resumed.pt"), progress=False))
    assert [m.epoch for m in resumed.metrics] == [1, 2]
    a = load_checkpoint(straight.output).state_dict
    b = load_checkpoint(tmp_path / "resumed.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = load_checkpoint(straight.output).metrics
    assert resumed.metrics[1].train_loss == ref[1].train_loss and resumed.metrics[1].eval_acc == ref[1].eval_acc


def test_reuse_returns_a_finished_run_without_training(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    first = finetune(config)
    stamp = Path(config.output).stat().st_mtime_ns
    again = finetune(config, reuse=True)
    assert again.reused and again.metrics == first.metrics and Path(config.output).stat().st_mtime_ns == stamp
    longer = finetune(tiny_config(tmp_path, epochs=2), reuse=True)  # same run, more epochs: continues
    assert not longer.reused and [m.epoch for m in longer.metrics] == [1, 2]


def test_resume_refuses_a_different_run_or_no_more_epochs(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    finetune(config)
    with pytest.raises(HardenError, match="already has 1 epochs"):
        finetune(resume_config(config.output))
    other = tiny_config(tmp_path, name="other.pt", head="random", epochs=2, resume=config.output)
    with pytest.raises(HardenError, match="trained with"):
        finetune(other)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HardenError, match="--embeddings"):
        finetune(tiny_config(tmp_path, embeddings=None))
    write_embeddings(tmp_path / "wrong.npz", classes=["cat", "dog"])
    with pytest.raises(HardenError, match="no row for classes"):  # digits are '0'..'9' 
        finetune(tiny_config(tmp_path, embeddings=str(tmp_path / "wrong.npz")))
    digits = load_dataset("digits:test")
    np.savez(tmp_path / "unnamed.npz", x=digits.images, y=digits.labels)
    with pytest.raises(HardenError, match="names no classes.*array 'classes'"):
        finetune(tiny_config(tmp_path, data=f"npz:{tmp_path / 'unnamed.npz'}", eval_data=None))
    with pytest.raises(HardenError):
        tiny_config(tmp_path, epochs=0)
    with pytest.raises(HardenError, match="unknown optimizer"):
        tiny_config(tmp_path, optimizer="lbfgs")
    with pytest.raises(HardenError, match="same label set"):
        finetune(tiny_config(tmp_path, eval_data="fashion-mnist:test", eval_limit=10))
    assert not (tmp_path / "ckpt.pt").exists()  # nothing written on refusal


def test_baseline_needs_no_embeddings_and_adamw_step_schedule_run(tmp_path: Path) -> None:
    result = finetune(tiny_config(tmp_path, head="baseline", embeddings=None, optimizer="adamw", lr=1e-3,
                                  schedule="step", step_size=1, gamma=0.5, epochs=2, label_smoothing=0.1))
    assert load_checkpoint(result.checkpoint).embeddings_sha256 == ""
    assert result.metrics[1].lr == pytest.approx(0.5e-3)


def test_lr_schedules(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=4, lr=0.2)
    assert lr_at(config, 0, 0, 10) == pytest.approx(0.2)
    assert lr_at(config, 2, 0, 10) == pytest.approx(0.1)
    assert lr_at(config, 3, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff([lr_at(config, e, s, 10) for e in range(4) for s in range(10)]) < 0)


def test_augment_flips_and_shifts_reproducibly() -> None:
    from harden.train.trainset import augment

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    a = augment(x, torch.Generator().manual_seed(1), max_shift=1)
    b = augment(x, torch.Generator().manual_seed(1), max_shift=1)
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(2):  # every output is a flipped and/or shifted copy of its input, zero-filled
        candidates = []
        for img in (x[i, 0], x[i, 0].flip(-1)):
            padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
            candidates += [padded[1 + dy:5 + dy, 1 + dx:5 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.equal(a[i, 0], c) for c in candidates)


def test_a_run_that_ends_at_chance_says_so(tmp_path: Path) -> None:
    """A stalled run is not a result: the log ends with a warning, with a hint for the text head under SGD."""
    lines: list[str] = []
    stalled = finetune(tiny_config(tmp_path, name="stalled.pt", lr=1e-9), log=lines.append)
    assert stalled.metrics[-1].train_acc <= 0.15
    assert lines[-1].startswith("warning: training accuracy ended at") and "--optimizer adamw" in lines[-1]
    lines.clear()
    finetune(tiny_config(tmp_path, name="learns.pt", head="baseline", epochs=3, limit=300, batch_size=50, lr=0.1),
             log=lines.append)
    assert not any(line.startswith("warning") for line in lines)
