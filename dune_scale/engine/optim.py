"""AdamW with the recipe's parameter groups, and gradient clipping per parameter or globally.

Weight-decay groups (``optim.wd_groups``):
- ``official`` (naver/dune): only biases and 1-D tensors (norms, layer-scale gammas) skip decay;
  cls/register tokens and the positional embedding are decayed.
- ``dune_scale``: additionally no decay on the learned tokens and the positional embedding.

Clipping (``optim.clip_mode``): ``per_param`` (official) scales each parameter's gradient to norm
≤ ``grad_clip`` on its own, with the coefficient ``grad_clip / (norm + 1e-6)``; ``global`` scales all
gradients by one coefficient from the global norm (``torch.nn.utils.clip_grad_norm_``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dune_scale.config import OptimConfig

_NO_DECAY_NAMES = ("cls_token", "register_tokens", "mask_token", "pos_embed")
# Added to the norm in the clip coefficient, as the official clip_gradients does.
_CLIP_EPS = 1e-6


def decays(name: str, param: torch.Tensor, wd_groups: str) -> bool:
    if wd_groups == "official":
        return param.ndim > 1 and not name.endswith(".bias")
    return param.ndim >= 2 and name.split(".")[-1] not in _NO_DECAY_NAMES


def param_groups(model: nn.Module, wd_groups: str) -> list[dict[str, Any]]:
    """Two groups; ``apply_weight_decay`` tells the trainer which one follows the wd schedule."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param, wd_groups) else no_decay).append(param)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]


def build_adamw(groups: list[dict[str, Any]], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """The fused implementation, because it can skip an update on a device flag (``skip_update``)."""
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)


def skip_update(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """Make the next ``optimizer.step()`` a no-op where ``skip`` is true, without a host sync: the
    fused AdamW kernel reads ``found_inf`` on the device (as for GradScaler) and leaves parameters,
    moments and step counts untouched."""
    optimizer.found_inf = skip.float().reshape(())


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = weight_decay


def clip_per_parameter_(
    pieces: Sequence[torch.Tensor],
    owners: Sequence[int],
    num_params: int,
    max_norm: float | None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Scale every parameter's gradient to norm ≤ ``max_norm`` (None: leave it); returns the
    pre-clip norm of each of the ``num_params`` parameters.

    A parameter's gradient may be split into pieces (``pieces[i]`` belongs to parameter
    ``owners[i]``) spread over the ranks of ``group`` (FSDP shards, ZeRO partitions): squared piece
    norms are summed per parameter over the ranks first, so each piece is scaled by the coefficient
    of the full parameter. Collective over ``group`` (every rank calls it, also with no piece).
    """
    owners = list(owners)
    device = pieces[0].device if pieces else torch.device("cpu")
    piece_norms = [norm.float() for norm in torch._foreach_norm(list(pieces))] if pieces else []
    if group is None and owners == list(range(num_params)):
        norms = torch.stack(piece_norms) if pieces else torch.zeros(0, device=device)
    else:
        # Python-side grouping: an index tensor would be a host→device copy, which waits for the GPU.
        squared: dict[int, torch.Tensor] = {}
        for owner, norm in zip(owners, piece_norms):
            squared[owner] = squared[owner] + norm.square() if owner in squared else norm.square()
        zero = torch.zeros((), device=device)
        total = torch.stack([squared.get(index, zero) for index in range(num_params)]) if num_params else zero.reshape(0)
        if group is not None:
            dist.all_reduce(total, group=group)
        norms = total.sqrt()
    if max_norm is not None:
        coefficients = (max_norm / (norms + _CLIP_EPS)).clamp(max=1.0)
        for piece, owner in zip(pieces, owners):
            piece.mul_(coefficients[owner].to(piece.dtype))
    return norms


def clip_gradients_(params: Sequence[torch.Tensor], cfg: OptimConfig) -> torch.Tensor:
    """Clip ``params``' gradients as ``cfg`` says (plain or FSDP DTensor gradients); returns the
    pre-clip global gradient norm (a plain device tensor: no host sync)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if cfg.clip_mode == "global":
        if cfg.grad_clip is None:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    sharded = bool(grads) and isinstance(grads[0], DTensor)
    pieces = [g.to_local() for g in grads] if sharded else grads
    # The mesh's last dimension shards (HSDP's first one replicates: its ranks hold the same pieces).
    group = grads[0].device_mesh.get_group(grads[0].device_mesh.ndim - 1) if sharded else None
    norms = clip_per_parameter_(pieces, range(len(pieces)), len(pieces), cfg.grad_clip, group)
    return torch.linalg.vector_norm(norms)
