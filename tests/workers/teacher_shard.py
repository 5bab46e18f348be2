"""torchrun worker: teacher features with FSDP2-sharded teachers equal the replicated ones."""

import sys
from pathlib import Path

import torch

from dune_scale import distributed
from dune_scale.engine.parallelize import shard_frozen_module
from dune_scale.teachers import TeacherEnsemble, build_teacher, get_teacher_spec

NAMES = ["dino2reg_vitlarge_14", "mast3r_vitlarge_16", "multihmr_vitlarge_14_672"]


def ensemble() -> TeacherEnsemble:
    torch.manual_seed(0)
    teachers = {n: build_teacher(n, embed_dim=32, depth=2, num_heads=4, **({} if n.startswith("mast3r") else {"img_size": 70})) for n in NAMES}
    return TeacherEnsemble(teachers, {n: get_teacher_spec(n).tokens for n in NAMES}, 14, torch.float32)


def main() -> None:
    dist = distributed.init_distributed("cpu")
    images = torch.randn(3, 3, 56, 42, generator=torch.Generator().manual_seed(dist.rank))
    replicated = ensemble()(images)
    sharded_ensemble = ensemble()
    for teacher in sharded_ensemble.teachers.values():
        shard_frozen_module(teacher, teacher.blocks, torch.float32)
    sharded = sharded_ensemble(images)
    diffs = {f"{n}.{t}": (sharded[n][t] - replicated[n][t]).abs().max().item() for n in NAMES for t in replicated[n]}
    torch.save(diffs, Path(sys.argv[1]) / f"diff_{dist.rank}.pt")
    del sharded_ensemble, sharded  # free the sharded modules while the process group still exists
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
