"""The one place that knows about the process group: rank, world size, device, collectives.

Everything works without an initialised process group (single process), so library code calls
these helpers unconditionally. The backend follows the device: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a per-rank random stream: distinct per rank, reproducible from ``run.seed``."""
    return seed * 1_000_003 + rank


# torchrun and the deepspeed launcher set these; under plain `srun` SLURM's own names say the same.
_SLURM_NAMES = {
    "RANK": "SLURM_PROCID",
    "WORLD_SIZE": "SLURM_NTASKS",
    "LOCAL_RANK": "SLURM_LOCALID",
    "LOCAL_WORLD_SIZE": "SLURM_NTASKS_PER_NODE",
}


def normalise_launcher_environment() -> None:
    """Export the rank layout under the names torch and Streaming read, whatever the launcher.

    torchrun sets them all; the deepspeed launcher names the local world size LOCAL_SIZE (Streaming
    would then think every rank leads its own node and they would collide on shared memory); plain
    `srun` only sets SLURM's names.
    """
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]
    if "WORLD_SIZE" in os.environ or "SLURM_PROCID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    for name, slurm_name in _SLURM_NAMES.items():
        if slurm_name in os.environ:
            os.environ[name] = os.environ[slurm_name].split("(")[0]
    os.environ.setdefault("MASTER_PORT", "29500")


def launched_world_size() -> int:
    """World size the launcher (torchrun / deepspeed / SLURM srun) asked for, before init."""
    normalise_launcher_environment()
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda was requested but no CUDA device is visible")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(requested_device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group the launcher set up (no-op for a single process); the returned
    :class:`DistInfo` is passed explicitly to everything that needs rank, world or device.
    ``timeout_s``: how long a collective waits for the other ranks (None: torch's default)."""
    device = pick_device(requested_device)
    world = launched_world_size()
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # The device's default backend: NCCL on CUDA, gloo on CPU.
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend=dist.get_default_backend_for_device(device), timeout=timeout)
    return DistInfo(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        world_size=dist.get_world_size() if dist.is_initialized() else 1,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        device=device,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor for chaining."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (e.g. "does any rank want to stop"); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

