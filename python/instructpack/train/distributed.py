"""This process's place in the job (set by torchrun) and the few collectives the loop uses."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..environment import collective_timeout_s


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # processes on this machine (FSDP's hybrid sharding mesh)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> World:
    """Reads torchrun's environment and joins the process group, even with one process:
    FSDP2 and DeepSpeed need a group. Collectives wait INSTRUCTLAB_NCCL_TIMEOUT_MS for the
    other ranks (30 minutes when unset). Without torchrun (no RANK/WORLD_SIZE) it is a single
    CPU/GPU process with no group; `ensure_process_group` makes one when a backend needs it."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(_backends(device), timeout=datetime.timedelta(seconds=collective_timeout_s()),
                                device_id=device if device.type == "cuda" else None)
    return World(rank, local_rank, world_size, device, local_world_size)


def _backends(device: torch.device) -> str:
    # On GPUs, nccl for CUDA tensors and gloo for CPU ones: FSDP2's CPU offload leaves
    # gradients on the CPU, and clipping all-reduces their norm there.
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def ensure_process_group(world: World) -> None:
    """A one-process group for FSDP2 or DeepSpeed outside torchrun (tests, notebooks);
    under torchrun, init_distributed has joined the real one. DeepSpeed also reads
    LOCAL_RANK, RANK and WORLD_SIZE from the environment."""
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    if dist.is_initialized():
        return
    if world.world_size != 1:
        raise RuntimeError("several processes need the torchrun process group (init_distributed) "
                           "before a backend is built")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(_backends(world.device), store=dist.HashStore(), rank=0, world_size=1)


def all_reduce(values: list[float], world: World, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over ranks in one collective, in float64 so token counts
    stay exact."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")  # the module whose global `cdb` is live
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        # Also drops DeepSpeed's cached handles to the groups, which a later engine in this
        # process (a notebook, a second run) would otherwise find destroyed.
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
