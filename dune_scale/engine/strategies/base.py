"""The strategy interface: how the student is placed, stepped and saved across ranks, what a launch
may ask of it, and the checkpoint files it writes and reads."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar, ContextManager

import torch
from torch import nn

from dune_scale.config import Config
from dune_scale.distributed import DistInfo


class Strategy(ABC):
    name: ClassVar[str]
    # strategy.* settings only this strategy reads: set under another strategy, they are refused.
    options: ClassVar[tuple[str, ...]] = ()

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

    def save_async(self, directory: Path, process_group: Any) -> Future | None:
        """Start :meth:`save` so that it overlaps training (``checkpoint.async_save``): the state is
        staged before this returns; the future completes when the files are written. Strategies
        whose library cannot do that write here and return None."""
        self.save(directory)
        return None

    @abstractmethod
    def load(self, directory: Path) -> None: ...

    def checkpoint_layout(self) -> dict[str, Any]:
        """What the files ``save`` writes depend on, beyond the model: a resume must match it.
        Single and FSDP (DCP reshards on load) depend on the strategy alone."""
        return {"strategy": self.name}

    @abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) student weights, on every rank, for export and pretrained loading."""

    @classmethod
    def check_launch(cls, cfg: Config, dist: DistInfo) -> None:
        """Refuse, with a :class:`~dune_scale.config.ConfigError` naming the setting, what this
        strategy cannot do with ``cfg`` under this launch (rank count, nodes, installed packages),
        before anything is built or written. Nothing by default."""
        return None

    @classmethod
    def resume_problem(cls, saved: dict[str, Any], current: dict[str, Any]) -> str | None:
        """Why files this strategy wrote under the :meth:`checkpoint_layout` ``saved`` cannot be
        loaded by a run of this strategy whose layout is ``current`` (and how to go on); None when
        they can, the default: the files do not depend on the rank count."""
        return None

    @classmethod
    def convert_for_any_rank_count(cls, directory: Path, workers: int) -> str | None:
        """Convert the files :meth:`save` wrote into ``directory`` once, ahead of a resume on
        another rank count (``launch/convert_checkpoint.py``), using ``workers`` processes; returns
        what was done. None (the default): they load on any rank count as they are."""
        return None

    @classmethod
    @abstractmethod
    def read_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The full student weights from the files :meth:`save` wrote into ``directory``, in this
        process (no process group, whatever rank count wrote them): what export and stage-2
        initialisation read. :class:`CheckpointError` names a file that is missing or unreadable."""
