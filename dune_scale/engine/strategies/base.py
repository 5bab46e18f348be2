"""Strategies: how the student is placed, stepped and saved across ranks, behind one interface.

The trainer never branches on the strategy: it calls ``forward``, ``backward``, ``step``, ``save``
and ``load``. Each strategy owns its optimizer because DeepSpeed and FSDP both need to (ZeRO
partitions optimizer state, FSDP shards parameters before the optimizer sees them).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from dune_scale.config import Config
from dune_scale.distributed import DistInfo
from dune_scale.engine.optim import build_adamw, param_groups, set_hyperparameters


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
    def step(self, lr: float, weight_decay: float) -> torch.Tensor:
        """Clip gradients, update, zero gradients; returns the pre-clip global grad norm (no sync)."""

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
        self.optimizer = build_adamw(param_groups(self._module), self.cfg.optim, peak_lr)

    @property
    def module(self) -> nn.Module:
        return self._module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, weight_decay: float) -> torch.Tensor:
        set_hyperparameters(self.optimizer, lr, weight_decay)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._module.parameters(), self.cfg.optim.grad_clip)
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
