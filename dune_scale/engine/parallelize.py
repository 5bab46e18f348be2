"""Per-block transforms shared by every strategy: activation checkpointing, torch.compile, and
FSDP2 sharding of frozen teachers. Models stay plain ``nn.Module``s; parallelism is applied here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from dune_scale.distributed import DistInfo

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def transformer_blocks(student: nn.Module) -> Iterator[tuple[nn.ModuleList, int]]:
    """(container, index) of every transformer block of the student: encoder, then projectors."""
    containers = [student.encoder.blocks, *(p.blocks for p in student.projectors.values())]
    for container in containers:
        for index in range(len(container)):
            yield container, index


def apply_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each block's activations in backward. The wrapper's state-dict hooks keep the
    parameter names unchanged, so checkpoints do not depend on this switch."""
    for container, index in transformer_blocks(student):
        container[index] = checkpoint_wrapper(container[index], preserve_rng_state=True)


def apply_compile(student: nn.Module) -> None:
    """Compile each block in place (``Module.compile`` keeps parameter names)."""
    for container, index in transformer_blocks(student):
        container[index].compile()


def prepare_student(
    student: nn.Module, activation_checkpointing: bool, compile_blocks: bool, whole_model: bool = False
) -> None:
    """``whole_model``: compile the student with its projectors as one graph instead of block by block."""
    # Checkpoint first, then compile the checkpointed block (the torchtitan order).
    if activation_checkpointing:
        apply_activation_checkpointing(student)
    if compile_blocks and whole_model:
        student.compile()
    elif compile_blocks:
        apply_compile(student)


def teacher_mesh(scope: str, dist: DistInfo) -> DeviceMesh:
    """The device mesh frozen teachers are sharded over (``teachers.shard``): all ranks ("world"),
    or a 2-D ("replicate", "shard") mesh whose rows are nodes ("node": FSDP2 hybrid sharding, so
    the per-step weight all-gathers run over the node's NVLink, never the inter-node network)."""
    from torch.distributed.device_mesh import init_device_mesh

    if scope == "world":
        return init_device_mesh(dist.device.type, (dist.world_size,), mesh_dim_names=("shard",))
    if scope == "node":
        nodes = dist.world_size // dist.local_world_size
        return init_device_mesh(dist.device.type, (nodes, dist.local_world_size), mesh_dim_names=("replicate", "shard"))
    raise ValueError(f"teachers.shard={scope!r} does not shard")


def student_mesh(scope: str, dist: DistInfo) -> DeviceMesh | None:
    """The mesh FSDP2 shards the student over (``strategy.fsdp_shard``): None for all ranks (FSDP's
    default), or the teachers' node mesh for "node" (HSDP: shards within a node, replicas across)."""
    return teacher_mesh("node", dist) if scope == "node" else None


def node_sharding_problem(key: str, dist: DistInfo) -> str | None:
    """Why ``key``=node cannot shard within nodes on this launch, or None when it can."""
    if dist.local_world_size > 1 and dist.world_size % dist.local_world_size == 0:
        return None
    return (
        f"{key}=node shards within each node, but the launch has {dist.local_world_size} rank(s) per node "
        f"of {dist.world_size}: it needs several ranks per node and the same number on every node"
    )


def shard_frozen_module(module: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype, mesh: DeviceMesh | None = None) -> None:
    """FSDP2-shard a frozen encoder over ``mesh`` (default: all ranks): each block's weights are
    gathered for its forward and freed after it, so a ViT-L teacher costs 1/shards of its weights
    per rank between uses."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
