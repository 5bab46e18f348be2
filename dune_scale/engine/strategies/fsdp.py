"""FSDP2: ``fully_shard`` per transformer block and per projector, then the whole student.

Parameters are sharded across ranks (fp32 master copy) and gradients reduce-scattered in fp32. By
default the parameters are also gathered in fp32 and bf16 comes from autocast, as under ``single``,
DeepSpeed and the official code (fp32 norms, layer-scales and residual stream);
``strategy.fsdp_param_dtype=bf16`` gathers them in bf16 instead (half the all-gather traffic, but
every op, the residual stream included, then runs in bf16). ``strategy.fsdp_shard=node`` shards
within each node and replicates across nodes (HSDP). Checkpoints go through
torch.distributed.checkpoint: each rank writes its own shards, and a run may resume on another
number of ranks.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from dune_scale.config import Config, ConfigError
from dune_scale.distributed import DistInfo
from dune_scale.engine.checkpoint_files import CheckpointError, load_dcp, read_dcp_keys
from dune_scale.engine.optim import build_adamw, param_groups
from dune_scale.engine.parallelize import node_sharding_problem, student_mesh
from dune_scale.engine.strategies.single import SingleStrategy

# The folder of a checkpoint part that DCP writes, every rank its shards.
DCP_FOLDER = "fsdp"


class FSDPStrategy(SingleStrategy):
    """Sharded parameters; backward and the optimizer step are plain PyTorch, as in ``single``."""

    name = "fsdp"
    options = ("fsdp_param_dtype", "fsdp_shard")

    @classmethod
    def check_launch(cls, cfg: Config, dist: DistInfo) -> None:
        """Any rank count; node sharding needs the same rank count on every node; blocks are
        compiled one by one (each is sharded on its own)."""
        if cfg.train.compile_scope == "model":
            raise ConfigError("train.compile_scope: 'model' is not allowed; FSDP2 shards each block, so blocks are compiled "
                              "one by one: use compile_scope=blocks")
        if cfg.strategy.fsdp_shard == "node" and (problem := node_sharding_problem("strategy.fsdp_shard", dist)):
            raise ConfigError(f"{problem} (use strategy.fsdp_shard=world)")

    def setup(self, student: nn.Module, peak_lr: float) -> None:
        bf16_params = self.cfg.train.precision == "bf16" and self.cfg.strategy.fsdp_param_dtype == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_params else None, reduce_dtype=torch.float32)
        reshard = self.cfg.strategy.reshard_after_forward
        mesh = student_mesh(self.cfg.strategy.fsdp_shard, self.dist)
        student.to(self.device)
        for block in student.encoder.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        for projector in student.projectors.values():
            fully_shard(projector, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        # The root keeps the small leftovers (patch embed, tokens, norms); no reshard after its forward,
        # since backward needs them right away.
        fully_shard(student, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        self._module = student
        self.optimizer = build_adamw(param_groups(student, self.cfg.optim.wd_groups), self.cfg.optim, peak_lr)

    def save(self, directory: Path) -> None:
        model, optim = get_state_dict(self._module, self.optimizer)
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(directory / DCP_FOLDER))

    def save_async(self, directory: Path, process_group: Any) -> Future:
        """DCP copies the shards to CPU memory now and writes them in its own thread, its
        collectives on ``process_group`` (not the one training uses meanwhile)."""
        model, optim = get_state_dict(self._module, self.optimizer)
        return dcp.async_save({"model": model, "optim": optim}, checkpoint_id=str(directory / DCP_FOLDER), process_group=process_group)

    def load(self, directory: Path) -> None:
        model, optim = get_state_dict(self._module, self.optimizer)
        state = {"model": model, "optim": optim}
        load_dcp(state, directory / DCP_FOLDER)
        set_state_dict(self._module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self._module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    @classmethod
    def read_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The ``model`` entry of the DCP folder, its shards merged in this process."""
        if not (directory / DCP_FOLDER).is_dir():
            raise CheckpointError(f"{directory / DCP_FOLDER} is missing: a strategy.name={cls.name} checkpoint keeps the "
                                  "student's shards there")
        return read_dcp_keys(directory / DCP_FOLDER, {"model"})["model"]
