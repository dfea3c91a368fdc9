"""The torchrun code path (DistributedDataParallel, DistributedSampler, rank-0 writes) on CPU with gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harden.errors import HardenError
from harden.train.checkpoint import load_checkpoint
from harden.train.distributed import setup_distributed
from harden.train.finetune import finetune
from harden.train.loop import epoch_batches
from tests.train.tiny import tiny_config, write_embeddings

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_torchrun_env_means_single_process(monkeypatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = setup_distributed(use_cuda=False)
    assert not ctx.enabled and ctx.world_size == 1 and ctx.is_main


def test_incomplete_torchrun_env_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(HardenError, match="torchrun"):
        setup_distributed(use_cuda=False)


def test_ddp_world_size_one_matches_plain_run(tmp_path: Path, monkeypatch) -> None:
    plain = finetune(tiny_config(tmp_path, name="plain.pt"))
    for var, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(var, value)
    ddp = finetune(tiny_config(tmp_path, name="ddp.pt"))
    assert not dist.is_initialized()  # the group opened for the run was closed
    a, b = load_checkpoint(plain.checkpoint).state_dict, load_checkpoint(ddp.checkpoint).state_dict
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert [m.eval_acc for m in ddp.metrics] == pytest.approx([m.eval_acc for m in plain.metrics])


def test_sampler_shards_are_disjoint_and_cover_the_data(tmp_path: Path) -> None:
    from harden.train.distributed import DistContext

    config = tiny_config(tmp_path, batch_size=8)
    shards = [torch.cat(epoch_batches(40, 3, config, DistContext(world_size=2, rank=r, enabled=True)))
              for r in (0, 1)]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(40))
    again = torch.cat(epoch_batches(40, 3, config, DistContext(world_size=2, rank=0, enabled=True)))
    other_epoch = torch.cat(epoch_batches(40, 4, config, DistContext(world_size=2, rank=0, enabled=True)))
    assert torch.equal(again, shards[0]) and not torch.equal(other_epoch, shards[0])


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    emb = write_embeddings(tmp_path / "emb.npz")
    out = tmp_path / "ddp2.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",  # picks its own port
           "-m", "harden", "finetune", "--arch", "tinyresnet", "--data", "digits:train", "--limit", "96",
           "--eval-limit", "48", "--batch-size", "24", "--embeddings", str(emb), "--epochs", "1",
           "--threads", "1", "--no-progress", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("epoch 1/1") == 1  # rank 0 alone reports
    ckpt = load_checkpoint(out)
    assert ckpt.epoch == 1 and ckpt.metrics[0].eval_acc is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp2.pt", "emb.npz"]
