"""Everything that touches ``torch.distributed``: each helper is the identity in one process.

Launchers: ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``) and SLURM
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the master address must be exported by the job script).
With none of them set, the whole pipeline runs as one plain process.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
import torch.distributed as dist

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int


def launch_info() -> LaunchInfo:
    """Read rank / world size / local rank from torchrun's or SLURM's variables (defaults: one process)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")))
    return LaunchInfo(0, 1, 0)


def init(backend: str | None = None) -> LaunchInfo:
    """Join the process group when the launcher asked for more than one process; no-op otherwise.

    Args:
        backend: ``"nccl"``/``"gloo"``; default ``nccl`` when CUDA is available, else ``gloo``.
    """
    info = launch_info()
    if info.world_size > 1 and not is_enabled():
        env = os.environ
        # SLURM gives ranks but not torchrun's names; torch's env:// init reads these two.
        env.setdefault("RANK", str(info.rank))
        env.setdefault("WORLD_SIZE", str(info.world_size))
        env.setdefault("MASTER_PORT", "29500")
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=chosen, init_method="env://")
    return info


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if is_enabled():
        dist.destroy_process_group()


def is_enabled() -> bool:
    """True when a process group with more than one member is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in one process)."""
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    """Number of processes (1 in one process)."""
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    """True on rank 0, the only process that writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_enabled():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, returning a new tensor (the input itself in one process)."""
    if not is_enabled():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over processes."""
    if not is_enabled():
        return tensor
    return all_reduce_sum(tensor) / world_size()


def all_gather_ragged(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all processes, ordered by rank; dim 0 may differ per rank.

    Args:
        tensor: ``(R_rank, ...)``; the trailing shape must agree across processes.

    Returns:
        ``(sum of R_rank, ...)``. Not differentiable (used for memory-bank pushes only).
    """
    if not is_enabled():
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every process."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorate ``fn`` so that it only runs on rank 0 (returns None elsewhere)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


class RankZeroFilter(logging.Filter):
    """A logging filter that lets records through on rank 0 only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()
