"""One process, one device: the reference every distributed strategy is tested against."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dune_scale.config import Config, ConfigError
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError, read_torch_file
from dune_scale.engine.optim import build_adamw, clip_gradients_, param_groups, set_hyperparameters, skip_update
from dune_scale.engine.strategies.base import Strategy

# The files a checkpoint part holds: the student's state and its optimizer's.
MODEL_FILE, OPTIMIZER_FILE = "model.pt", "optimizer.pt"


class SingleStrategy(Strategy):
    """One process, one device: the reference every distributed strategy is tested against."""

    name = "single"

    @classmethod
    def check_launch(cls, cfg: Config, dist: DistInfo) -> None:
        if dist.world_size > 1:
            raise ConfigError(
                f"strategy.name={cls.name} runs one process, but {dist.world_size} were launched; "
                "use strategy.name=fsdp or deepspeed, or launch one process"
            )

    def setup(self, student: nn.Module, peak_lr: float) -> None:
        self._module = student.to(self.device)
        self.optimizer = build_adamw(param_groups(self._module, self.cfg.optim.wd_groups), self.cfg.optim, peak_lr)

    @property
    def module(self) -> nn.Module:
        return self._module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, weight_decay: float, skip: torch.Tensor) -> torch.Tensor:
        set_hyperparameters(self.optimizer, lr, weight_decay)
        grad_norm = clip_gradients_(list(self._module.parameters()), self.cfg.optim)
        skip_update(self.optimizer, skip | ~torch.isfinite(grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, directory: Path) -> None:
        torch.save(self._module.state_dict(), directory / MODEL_FILE)
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        self._module.load_state_dict(read_torch_file(directory / MODEL_FILE, map_location=self.device))
        self.optimizer.load_state_dict(read_torch_file(directory / OPTIMIZER_FILE, map_location=self.device))

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self._module.state_dict()

    @classmethod
    def read_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        path = directory / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: a strategy.name={cls.name} checkpoint keeps the student's weights there")
        return read_torch_file(path)
