"""Multi-GPU and multi-node training through `torchrun`.

torchrun (torch.distributed.run) starts one process per device and sets
WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. When those are present
the fine-tune loop joins the process group (NCCL on CUDA, gloo on CPU), wraps the
model in DistributedDataParallel, shards the data with DistributedSampler and
lets only rank 0 write files. Without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from harden.errors import HardenError

TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistContext:
    """This process's place in the job; `owned` means this code opened the process group."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    enabled: bool = False
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device: Any = None) -> list[float]:
        """Element-wise sum of `values` over all processes (identity when not distributed)."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [float(v) for v in tensor.cpu()]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this code opened it."""
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False
            self.enabled = False


def torchrun_env() -> dict[str, str] | None:
    """The torchrun variables when this process was started by torchrun, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise HardenError(f"incomplete torchrun environment: {missing} not set; start with torchrun")
    return {v: os.environ[v] for v in TORCHRUN_VARS}


def setup_distributed(use_cuda: bool) -> DistContext:
    """Join the process group announced by torchrun's environment, if any."""
    env = torchrun_env()
    if env is None:
        return DistContext()
    import torch
    import torch.distributed as dist

    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env["LOCAL_RANK"])
    except ValueError as err:
        raise HardenError(f"torchrun environment is malformed: {err}") from err
    if not dist.is_available():
        raise HardenError("this torch build has no torch.distributed support")
    if use_cuda:
        torch.cuda.set_device(local)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                world_size=world, rank=rank)
        owned = True
    return DistContext(world_size=world, rank=rank, local_rank=local, enabled=True, owned=owned)
