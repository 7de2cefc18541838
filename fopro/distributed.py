"""Data-parallel training under `torchrun` (PyTorch's torch.distributed): process group set-up from the
environment torchrun defines (RANK, WORLD_SIZE, LOCAL_RANK), gradient averaging, rank-0-only output."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fopro.errors import FoproError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistEnv()


def env_from_environment() -> DistEnv:
    """The process's place in a torchrun job; a single process when WORLD_SIZE is unset or 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise FoproError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them): {err}") from err
    return DistEnv(rank, world, local)


def init(device: str) -> DistEnv:
    """Initialise the process group when launched by torchrun: nccl on GPU, gloo on CPU."""
    env = env_from_environment()
    if not env.enabled or dist.is_initialized():
        return env
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=60))
    return env


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    if env.enabled and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def average_gradients(parameters: Iterable[torch.nn.Parameter], env: DistEnv) -> None:
    """All-reduce and average the gradients, in one flat buffer per dtype (what DDP does, without buckets)."""
    if not env.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(env.world_size)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def any_flag(flags: list[bool], env: DistEnv, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all processes (stop requests, non-finite losses)."""
    if not env.enabled:
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_text(text: str, env: DistEnv) -> str:
    """Rank 0's value of a string (e.g. a run folder named after the time) on every process."""
    if not env.enabled:
        return text
    holder = [text]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
