"""DeepSpeed ZeRO stage 1/2/3. The DeepSpeed JSON is generated from our config (bf16, clipping,
optimizer, accumulation) and a user JSON (``strategy.deepspeed_config``) may be merged on top.

Our AdamW (with the recipe's parameter groups) is handed to DeepSpeed as a client optimizer, which
ZeRO partitions; it is torch's Adam, so a resumed run is bitwise identical (DeepSpeed's CPU Adam
drifts by an ulp after a reload). Gradient accumulation is left to the trainer
(``managed_gradient_accumulation: false``): each ``backward`` accumulates locally and ``step`` is
the boundary that reduces, clips and updates. bf16 uses DeepSpeed's torch-autocast mode, which
keeps fp32 parameters and teacher-norm buffers, like the other strategies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dune_scale.config import ConfigError, deep_merge
from dune_scale.engine.optim import build_adamw, param_groups, set_hyperparameters
from dune_scale.engine.strategies.base import Strategy

_TAG = "deepspeed"


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg`` (+ the user's ``strategy.deepspeed_config`` merged over it)."""
    t = cfg.train
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size_per_rank,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.batch_size_per_rank * t.grad_accum_steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip,
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


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def setup(self, student: nn.Module, peak_lr: float) -> None:
        import deepspeed

        student.to(self.device)
        optimizer = build_adamw(param_groups(student), self.cfg.optim, peak_lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=optimizer, config=deepspeed_config(self.cfg, self.dist.world_size)
        )

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def forward(self, images: torch.Tensor) -> Any:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float, weight_decay: float) -> torch.Tensor:
        set_hyperparameters(self.optimizer, lr, weight_decay)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return norm.detach().float() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm if norm is not None else "nan"))

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory / _TAG}")

    def checkpoint_layout(self) -> dict[str, Any]:
        """ZeRO files hold per-rank partitions of one stage: both must match on resume."""
        return {"strategy": self.name, "zero_stage": self.cfg.strategy.zero_stage, "world_size": self.dist.world_size}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        if self.cfg.strategy.zero_stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in self.engine.module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
