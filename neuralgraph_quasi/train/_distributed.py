"""DistributedDataParallel plumbing: a process group from torchrun's environment, or none."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.data.distributed import DistributedSampler

__all__ = ["Dist", "init_distributed", "ResumableSampler"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world_size == 1``: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    The backend is NCCL on CUDA and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local)


class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` (seeded shuffle per epoch, one shard per rank) that can
    skip the first ``skip`` indices of its shard: a run resumed in the middle of an epoch
    continues with exactly the graphs it had not seen."""

    def __init__(self, dataset, dist: Dist, seed: int) -> None:
        super().__init__(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)
