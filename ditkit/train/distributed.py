"""Data-parallel context. Single process by default; `torchrun` sets RANK/WORLD_SIZE and the loop runs
under torch.distributed with DDP (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "DistContext":
        ws = int(os.environ.get("WORLD_SIZE", "1"))
        if ws <= 1:
            return DistContext()
        import torch.distributed as tdist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dev, backend = torch.device("cuda", local), "nccl"
        else:
            dev, backend = torch.device("cpu"), "gloo"
        if not tdist.is_initialized():
            tdist.init_process_group(backend=backend)
        return DistContext(rank, ws, local, dev)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist
            tdist.barrier()

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over ranks (for logging)."""
        if self.world_size > 1:
            import torch.distributed as tdist
            value = value.clone()
            tdist.all_reduce(value)
            value /= self.world_size
        return float(value)
