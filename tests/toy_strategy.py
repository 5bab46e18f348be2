"""A toy strategy for the test of the strategy registry: ``single``'s training (it is one process
on one device) with checkpoint files of its own, the student as safetensors in ``toy/``. What a
new strategy is: one module like this one and one line in ``STRATEGIES``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dune_scale.engine.checkpoint_files import CheckpointError, read_torch_file
from dune_scale.engine.strategies.single import SingleStrategy

FOLDER = "toy"


class ToyStrategy(SingleStrategy):
    name = "toy"

    def save(self, directory: Path) -> None:
        (directory / FOLDER).mkdir()
        save_file({k: v.detach().contiguous() for k, v in self.module.state_dict().items()}, str(directory / FOLDER / "student.safetensors"))
        torch.save(self.optimizer.state_dict(), directory / FOLDER / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(self.read_model_state(directory))
        self.optimizer.load_state_dict(read_torch_file(directory / FOLDER / "optimizer.pt"))

    @classmethod
    def read_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        path = directory / FOLDER / "student.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        return load_file(str(path))
