"""DeepSpeed ZeRO stage 1/2/3. The DeepSpeed JSON is generated from our config (bf16, clipping,
optimizer, accumulation) and a user JSON (``strategy.deepspeed_config``) may be merged on top.

Our AdamW (with the recipe's parameter groups) is handed to DeepSpeed as a client optimizer, which
ZeRO partitions; it is torch's Adam, so a resumed run is bitwise identical (DeepSpeed's CPU Adam
drifts by an ulp after a reload). Gradient accumulation is left to the trainer
(``managed_gradient_accumulation: false``): each ``backward`` accumulates locally and ``step`` is
the boundary that reduces, clips and updates. bf16 uses DeepSpeed's torch-autocast mode, which
keeps fp32 parameters and teacher-norm buffers, like the other strategies.

DeepSpeed only clips by the global norm (``optim.clip_mode=global``). Per-parameter clipping (the
default) runs in a step pre-hook of our AdamW: ZeRO steps it once per flat fp32 partition, after
reducing the gradients into it, and the hook scales each parameter's piece of that partition by the
coefficient of the whole parameter (squared piece norms all-reduced over the data-parallel group).

ZeRO files are partitioned for the rank count that wrote them: a resume on another one loads them
through DeepSpeed's universal checkpoint, converted on the way (``engine/universal.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.config import Config, ConfigError, deep_merge
from dune_scale.distributed import DistInfo, barrier
from dune_scale.engine.checkpoint_files import CheckpointError, deepspeed_loads, read_torch_file
from dune_scale.engine.optim import build_adamw, clip_per_parameter_, param_groups, set_hyperparameters, skip_update
from dune_scale.engine.strategies.base import Strategy
from dune_scale.engine.universal import (
    UNIVERSAL_FOLDER,
    convert_to_universal,
    ensure_universal,
    saved_model_state,
    zero_files_layout,
)

# DeepSpeed's checkpoint tag: the folder inside a checkpoint that holds the ZeRO files.
ZERO_TAG = "deepspeed"


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` (+ the user's ``strategy.deepspeed_config`` merged over it)."""
    t = cfg.train
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_rank,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_rank * t.grad_accum_steps * world_size,
        "managed_gradient_accumulation": False,
        # Per-parameter clipping is done by DeepSpeedStrategy on ZeRO's partitions, not by DeepSpeed.
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.clip_mode == "global" and cfg.optim.grad_clip else 0.0,
        # Stage 1 with trainer-owned accumulation reduces in step(): nothing for overlap_comm to overlap.
        "zero_optimization": {
            "stage": cfg.strategy.zero_stage,
            "overlap_comm": cfg.strategy.zero_stage >= 2,
            "contiguous_gradients": True,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.strategy.deepspeed_config:
        path = Path(cfg.strategy.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"strategy.deepspeed_config: cannot read {path} as JSON: {err}") from None
        generated = deep_merge(generated, user)
    return generated


def _position(flat: torch.Tensor, partitions: list[torch.Tensor]) -> int:
    for index, partition in enumerate(partitions):
        if partition is flat:
            return index
    raise RuntimeError("ZeRO stepped a tensor that is none of its fp32 partitions; per-parameter clipping cannot place it")


def zero_partition_pieces(zero: Any, flat: torch.Tensor) -> tuple[list[torch.Tensor], list[int], int, Any]:
    """Where each parameter's gradient lies in the flat fp32 partition ``flat`` that ZeRO is about to
    step: (gradient pieces, index of each piece's parameter in its group, parameters in the group,
    the group's data-parallel process group). Every rank holds a piece of each parameter under
    ZeRO-3, and of the parameters crossing its partition under ZeRO-1/2."""
    if flat.grad is None:
        raise RuntimeError("ZeRO stepped a partition without gradients; per-parameter clipping cannot run")
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        sub_group = _position(flat, zero.fp32_partitioned_groups_flat)
        process_group = zero._get_sub_group_process_group(sub_group)
        rank = torch.distributed.get_rank(group=process_group)
        pieces, owners = [], []
        params = zero.fp16_groups[sub_group]
        for index, param in enumerate(params):
            _, offset, partition_numel = zero.grad_position[zero.get_param_id(param)]
            # The last ranks' partitions are padded past the parameter's end.
            real = min(partition_numel, max(0, param.ds_numel - rank * partition_numel))
            if real:
                pieces.append(flat.grad.narrow(0, offset, real))
                owners.append(index)
        return pieces, owners, len(params), process_group
    group = _position(flat, zero.single_partition_of_fp32_groups)  # ZeRO-1/2
    pieces, owners = [], []
    params = zero.bit16_groups[group]
    for index, param in enumerate(params):
        if param._hp_mapping is not None:
            address = param._hp_mapping.get_hp_fragment_address()
            pieces.append(flat.grad.narrow(0, address.start, address.numel))
            owners.append(index)
    return pieces, owners, len(params), zero.real_dp_process_group[group]


def unlink_shm_allreduce_segment(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one machine) maps one ``/dev/shm`` segment per rank
    and never unlinks it: ~69 MB per rank left behind by every run. Once every rank has mapped
    every segment, unlinking this rank's name frees the memory when the processes exit."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    options = ("deepspeed_config",)

    @classmethod
    def check_launch(cls, cfg: Config, dist: DistInfo) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"strategy.name={cls.name} needs the deepspeed package: pip install -e '.[deepspeed]'")

    @classmethod
    def resume_problem(cls, saved: dict[str, Any], current: dict[str, Any]) -> str | None:
        """Another rank count, or ZeRO-1 ↔ 2 (one optimizer, one universal format): :meth:`load`
        goes through a universal checkpoint. DeepSpeed 0.19.8 writes and reads ZeRO-3's in another
        layout (per-rank model-state files, one step count per partition), so 3 ↔ 1/2 cannot."""
        if (saved.get("zero_stage") == 3) == (current.get("zero_stage") == 3):
            return None
        allowed = "3" if saved.get("zero_stage") == 3 else "1 or 2"
        return (
            f"its DeepSpeed ZeRO files are for strategy.zero_stage={saved.get('zero_stage')}, this run uses "
            f"strategy.zero_stage={current.get('zero_stage')}; resume with strategy.zero_stage={allowed} "
            "(on any number of ranks), or start a new run from its weights with student.pretrained=<the run's "
            "student.safetensors>"
        )

    @classmethod
    def convert_for_any_rank_count(cls, directory: Path, workers: int) -> str | None:
        """DeepSpeed's universal checkpoint of the ZeRO files, beside them (they stay as written)."""
        universal = directory / UNIVERSAL_FOLDER
        if universal.is_dir():
            return f"{universal} exists already"
        ranks, stage = zero_files_layout(directory / ZERO_TAG)
        convert_to_universal(directory / ZERO_TAG, universal, workers=workers)
        return f"converted the ZeRO-{stage} files of {ranks} rank(s) in {directory} to {universal}; resume on any number of ranks"

    def setup(self, student: nn.Module, peak_lr: float) -> None:
        import deepspeed

        student.to(self.device)
        optimizer = build_adamw(param_groups(student, self.cfg.optim.wd_groups), self.cfg.optim, peak_lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=optimizer, config=deepspeed_config(self.cfg, self.dist.world_size)
        )
        self.client_optimizer = optimizer  # our AdamW, which ZeRO steps on its flat partitions
        barrier()  # every rank has mapped every rank's all-reduce segment (made in deepspeed.initialize)
        unlink_shm_allreduce_segment(self.dist.rank)
        if self.cfg.optim.clip_mode == "per_param" and self.cfg.optim.grad_clip is not None:
            # ZeRO reduces the gradients into flat fp32 partitions, then steps our AdamW on them one
            # partition at a time: clip there, just before each of those steps.
            optimizer.register_step_pre_hook(self._clip_partition_per_parameter)

    def _clip_partition_per_parameter(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for flat in group["params"]:
                pieces, owners, num_params, process_group = zero_partition_pieces(self.optimizer, flat)
                clip_per_parameter_(pieces, owners, num_params, self.cfg.optim.grad_clip, process_group)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, images: torch.Tensor) -> Any:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, weight_decay: float, skip: torch.Tensor) -> torch.Tensor:
        set_hyperparameters(self.optimizer, lr, weight_decay)
        # ZeRO itself skips the whole step when the gradient norm is not finite; ``skip`` reaches
        # the partitions' AdamW steps through the flag the fused kernel reads.
        skip_update(self.client_optimizer, skip)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm if norm is not None else "nan"))

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=ZERO_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        """ZeRO files written for this rank count and stage load as they are; others are converted
        once to DeepSpeed's universal checkpoint (kept in the checkpoint folder) and loaded from it."""
        zero_folder = directory / ZERO_TAG
        if zero_files_layout(zero_folder) == (self.dist.world_size, self.cfg.strategy.zero_stage):
            self._load_zero_files(directory)
            return
        universal = ensure_universal(directory, zero_folder, self.dist)
        # DeepSpeed copies the saved hyper-parameters of its first parameter group into every
        # group (ZeRO-3); the groups' own settings (no decay) come from this run's optimizer.
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.client_optimizer.param_groups]
        self.engine._config.load_universal_checkpoint = True  # read per load, not only at initialize
        try:
            self._load_zero_files(universal)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for group, own in zip(self.client_optimizer.param_groups, settings):
            group.update(own)
        # ZeRO-3 hands one step tensor to every partition; the fused AdamW increments its steps in
        # place, so shared, it would count each optimizer step once per partition.
        for state in self.client_optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        # A universal load restores parameters and optimizer state, not the module's buffers (the
        # teacher-norm statistics): they come from the saved module state.
        saved = saved_model_state(zero_folder)["module"]
        with torch.no_grad():
            for name, buffer in self.engine.module.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])

    def _load_zero_files(self, directory: Path) -> None:
        with deepspeed_loads():
            path, _ = self.engine.load_checkpoint(
                str(directory), tag=ZERO_TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / ZERO_TAG}")

    def checkpoint_layout(self) -> dict[str, Any]:
        """The rank count and stage the ZeRO files are partitioned for (another one resumes through
        DeepSpeed's universal checkpoint, see ``load``)."""
        return {"strategy": self.name, "zero_stage": self.cfg.strategy.zero_stage, "world_size": self.dist.world_size}

    @classmethod
    def read_model_state(cls, directory: Path) -> dict[str, torch.Tensor]:
        """The fp32 weights of the ZeRO-1/2/3 files, whatever rank count wrote them (DeepSpeed's
        ``zero_to_fp32``), and the module's other entries (buffers, frozen parameters)."""
        zero_folder = directory / ZERO_TAG
        if not zero_folder.is_dir():
            raise CheckpointError(f"{zero_folder} is missing: a strategy.name={cls.name} checkpoint keeps its ZeRO files there")
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise CheckpointError(f"{zero_folder}: DeepSpeed ZeRO files; reading them needs the deepspeed package") from None
        # Its progress report is not ours to print.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), deepspeed_loads():
            state = dict(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=ZERO_TAG))
        # ZeRO-1/2 merges only trainable parameters; the frozen final norm is whole in the module file.
        module_file = zero_folder / "mp_rank_00_model_states.pt"
        if module_file.is_file():
            module = read_torch_file(module_file)["module"]
            state.update({k: v for k, v in module.items() if k not in state})
        return state

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.strategy.zero_stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in self.engine.module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
