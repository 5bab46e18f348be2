"""Strategies: how the student is placed, stepped and saved across ranks, behind one interface.

The trainer never branches on the strategy: it calls ``forward``, ``backward``, ``step``, ``save``
and ``load``. Each strategy owns its optimizer because DeepSpeed and FSDP both need to (ZeRO
partitions optimizer state, FSDP shards parameters before the optimizer sees them).
"""

from __future__ import annotations

import contextlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from dune_scale.config import Config, ConfigError
from dune_scale.distributed import DistInfo
from dune_scale.engine.optim import build_adamw, clip_gradients_, param_groups, set_hyperparameters, skip_update


class Strategy(ABC):
    name: str

    def __init__(self, cfg: Config, dist: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device

    @abstractmethod
    def setup(self, student: nn.Module, peak_lr: float) -> None:
        """Place ``student`` on the devices and build its optimizer."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The student module whose attributes (encoder, projectors, teacher_norms) the trainer uses."""

    def forward(self, images: torch.Tensor) -> Any:
        return self.module(images)

    def autocast(self) -> ContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, lr: float, weight_decay: float, skip: torch.Tensor) -> torch.Tensor:
        """Clip gradients (``optim.clip_mode``), update, zero gradients; returns the pre-clip global
        grad norm (no sync). The update is skipped (on the device, every rank alike) where the
        boolean ``skip`` is true or the grad norm is not finite."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write model + optimizer state into ``directory`` (collective: every rank calls it)."""

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) student weights, on every rank, for export and pretrained loading."""


class SingleStrategy(Strategy):
    """One process, one device: the reference every distributed strategy is tested against."""

    name = "single"

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
        torch.save(self._module.state_dict(), directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        model = torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        self._module.load_state_dict(model)
        optim = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optim)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return self._module.state_dict()


def check_launch(cfg: Config, dist: DistInfo) -> None:
    """Launch/option combinations that cannot work, named before any model is built."""
    name = cfg.strategy.name
    output_dir = Path(cfg.run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir: {output_dir} is a file; give a folder (it is created if missing)")
    if name == "single" and dist.world_size > 1:
        raise ConfigError(
            f"strategy.name=single runs one process, but {dist.world_size} were launched; "
            "use strategy.name=fsdp or deepspeed, or launch one process"
        )
    if name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy.name=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
    if cfg.strategy.deepspeed_config and name != "deepspeed":
        raise ConfigError(f"strategy.deepspeed_config is set but strategy.name={name}; it only applies to deepspeed")
    if cfg.strategy.fsdp_param_dtype != "fp32" and name != "fsdp":
        raise ConfigError(f"strategy.fsdp_param_dtype is set but strategy.name={name}; it only applies to fsdp")
    if cfg.run.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"run.wandb_project={cfg.run.wandb_project} needs the wandb package: pip install -e '.[wandb]'")
    if cfg.teachers.shard and dist.world_size == 1:
        raise ConfigError("teachers.shard=true needs several ranks; with one process the teachers are whole anyway")


def build_strategy(cfg: Config, dist: DistInfo) -> Strategy:
    """The strategy ``strategy.name`` names (heavy imports only for the one used)."""
    name = cfg.strategy.name
    if name == "fsdp":
        from dune_scale.engine.fsdp_strategy import FSDPStrategy

        return FSDPStrategy(cfg, dist)
    if name == "deepspeed":
        from dune_scale.engine.deepspeed_strategy import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, dist)
    return SingleStrategy(cfg, dist)
