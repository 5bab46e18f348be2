"""AdamW with the recipe's parameter groups: no weight decay on biases, norms, tokens, pos-embed,
layer-scale gammas (every 0/1-D tensor, plus the learned tokens, which are 3-D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dune_scale.config import OptimConfig

_NO_DECAY_NAMES = ("cls_token", "register_tokens", "mask_token", "pos_embed")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and name.split(".")[-1] not in _NO_DECAY_NAMES


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups; ``apply_weight_decay`` tells the trainer which one follows the wd schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]


def build_adamw(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """Fused (one kernel for all parameters) where every parameter is on a GPU; the for-each
    implementation elsewhere (CPU, where fused AdamW is not the tested path)."""
    fused = all(p.is_cuda for group in groups for p in group["params"]) and any(group["params"] for group in groups)
    return torch.optim.AdamW(
        groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
    )


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay
