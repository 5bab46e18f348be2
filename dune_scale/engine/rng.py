"""Every random stream of one rank as one Stateful component, so a resumed run draws exactly what an
uninterrupted one would: python, numpy, torch (CPU and the run's CUDA device) and the generator of
teacher dropping (per rank, seeded from ``run.seed`` and the rank)."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from dune_scale.distributed import DistInfo, rank_seed

log = logging.getLogger(__name__)


class RankRandomState:
    def __init__(self, seed: int, dist: DistInfo) -> None:
        self.dist = dist
        self.drop_generator = torch.Generator(device=dist.device)
        self.drop_generator.manual_seed(rank_seed(seed, dist.rank))

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        state: dict[str, Any] = {
            "python_rng": list(random.getstate()[1]),
            "numpy_rng": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_rng_pos": int(numpy_state["state"]["pos"]),
            "torch_rng": torch.get_rng_state(),
            "drop_rng": self.drop_generator.get_state(),
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
        self.drop_generator.set_state(state["drop_rng"])
        if "cuda_rng" in state and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.dist.device)
