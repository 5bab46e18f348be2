"""torchrun worker: teacher features with FSDP2-sharded teachers equal the replicated ones.

``teacher_shard.py OUT SCOPE...`` (``world`` and/or ``node``, one after the other in one launch):
with ``node`` the ranks pretend to be nodes of two ranks each (the simulated 2 × 2 layout of four
ranks), so the teachers are sharded in pairs and replicated across them. For each scope, each rank
writes ``diff_<scope>_<rank>.pt`` and ``layout_<scope>_<rank>.pt``: the fraction of a teacher weight it
holds and the bytes it sent in the sharded forward's all-gathers (checked against the scale model).
"""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dune_scale import distributed
from dune_scale.engine.parallelize import shard_frozen_module, teacher_mesh
from dune_scale.teachers import TeacherEnsemble, build_teacher, get_teacher_spec

NAMES = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]
RANKS_PER_SIMULATED_NODE = 2


def ensemble() -> TeacherEnsemble:
    torch.manual_seed(0)
    teachers = {n: build_teacher(n, embed_dim=32, depth=2, num_heads=4, **({} if n.startswith("mast3r") else {"img_size": 70})) for n in NAMES}
    return TeacherEnsemble(teachers, {n: get_teacher_spec(n).tokens for n in NAMES}, 14, torch.float32)


def all_gather_bytes_sent(run: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """``run(*args)`` and the bytes this rank sends in the all-gathers it issues: in a ring, its shard
    to each of the other ranks of the group. Wraps both names FSDP2 calls (by torch version)."""
    import torch.distributed as dist

    sent = []
    originals = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "all_gather_single") if hasattr(dist, name)}

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def gather(output: torch.Tensor, shard: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
            sent.append(shard.numel() * shard.element_size() * (dist.get_world_size(group) - 1))
            return original(output, shard, group=group, async_op=async_op)

        return gather

    for name, original in originals.items():
        setattr(dist, name, counting(original))
    try:
        return run(*args), sum(sent)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def main() -> None:
    out, scopes = Path(sys.argv[1]), sys.argv[2:]
    dist = distributed.init_distributed("cpu")
    for scope in scopes:
        compare(out, scope, dataclasses.replace(dist, local_world_size=RANKS_PER_SIMULATED_NODE) if scope == "node" else dist)
    distributed.barrier()
    distributed.shutdown()


def compare(out: Path, scope: str, dist: distributed.DistInfo) -> None:
    images = torch.randn(3, 3, 56, 42, generator=torch.Generator().manual_seed(dist.rank))
    replicated = ensemble()(images)
    sharded_ensemble = ensemble()
    mesh = teacher_mesh(scope, dist)
    for teacher in sharded_ensemble.teachers.values():
        shard_frozen_module(teacher, teacher.blocks, torch.float32, mesh)
    sharded, sent = all_gather_bytes_sent(sharded_ensemble, images)
    diffs = {f"{n}.{t}": (sharded[n][t] - replicated[n][t]).abs().max().item() for n in NAMES for t in replicated[n]}
    torch.save(diffs, out / f"diff_{scope}_{dist.rank}.pt")
    weight = sharded_ensemble.teachers[NAMES[0]].blocks[0].mlp.fc1.weight  # a DTensor: this rank's shard
    layout = {
        "fraction": weight.to_local().numel() / weight.numel(),
        "shard": weight.to_local().clone(),
        "all_gather_bytes": sent,
        "teacher_params": sum(p.numel() for p in sharded_ensemble.parameters()),
        "teacher_blocks": sum(len(t.blocks) for t in sharded_ensemble.teachers.values()),
    }
    torch.save(layout, out / f"layout_{scope}_{dist.rank}.pt")
    del sharded_ensemble, sharded, weight  # free the sharded modules while the process group still exists


if __name__ == "__main__":
    main()
