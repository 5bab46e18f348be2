"""Every random stream of one rank as one Stateful component, so a resumed run draws exactly what an
uninterrupted one would: python, numpy, torch (CPU and the run's CUDA device) and, per student, the
generator of teacher dropping (seeded from the student's seed and the rank)."""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dune_scale.distributed import DistInfo, rank_seed

log = logging.getLogger(__name__)


def student_seed(run_seed: int, name: str) -> int:
    """The seed of a student's initial weights and random streams: ``run.seed`` for the one student
    of a config without ``students:``, else a function of ``run.seed`` and the name alone, so a
    student starts and draws alike whether trained alone or in a group."""
    if not name:
        return run_seed
    digest = hashlib.sha256(f"{run_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


class RankRandomState:
    def __init__(self, student_seeds: Mapping[str, int], dist: DistInfo) -> None:
        """``student_seeds``: student name → :func:`student_seed`; each gets its dropping generator."""
        self.dist = dist
        self.drop_generators: dict[str, torch.Generator] = {}
        for name, seed in student_seeds.items():
            self.drop_generators[name] = torch.Generator(device=dist.device)
            self.drop_generators[name].manual_seed(rank_seed(seed, dist.rank))

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        state: dict[str, Any] = {
            "python_rng": list(random.getstate()[1]),
            "numpy_rng": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_rng_pos": int(numpy_state["state"]["pos"]),
            "torch_rng": torch.get_rng_state(),
            "drop_rng": {name: generator.get_state() for name, generator in self.drop_generators.items()},
        }
        if self.dist.device.type == "cuda":  # a CPU run on a GPU machine has no CUDA device to ask
            state["cuda_rng"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """An empty ``state`` (a rank that did not exist at save time) keeps fresh streams."""
        if not state:
            log.warning("rank %d has no saved RNG state (more ranks than at save time): fresh RNG streams", self.dist.rank)
            return
        random.setstate((3, tuple(state["python_rng"]), None))
        numpy_state = np.random.get_state(legacy=False)
        numpy_state["state"] = {"key": state["numpy_rng"].numpy().astype(np.uint64), "pos": state["numpy_rng_pos"]}
        np.random.set_state(numpy_state)
        torch.set_rng_state(state["torch_rng"])
        for name, generator in self.drop_generators.items():
            generator.set_state(state["drop_rng"][name])
        if "cuda_rng" in state and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.dist.device)
