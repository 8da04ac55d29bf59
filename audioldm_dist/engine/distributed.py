"""Rank, world size and local rank from the launcher's environment (deepspeed/torchrun, or SLURM)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        """torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK; under srun, SLURM_* fill the gaps."""
        env = os.environ
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
        local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(env: DistEnv) -> torch.device:
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_process_group(env: DistEnv) -> None:
    """NCCL on CUDA, gloo on the CPU, through DeepSpeed (which also sets up its accelerator)."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def destroy_process_group(*, barrier: bool = True) -> None:
    """Tear down cleanly: ZeRO-3 has aborted at interpreter exit when the group was left open.

    After an error on this rank, no barrier: the other ranks may never reach it, and exiting lets the
    launcher (deepspeed, srun) stop them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
