"""Training diagnostics beyond the loss, at no extra host sync: what the trainer adds to log records.

- every step, on the device: the teacher-dropping weight each teacher received (coefficient sums);
- at logging steps only (read there with the loss): the loss split into weighted cosine / smooth-L1
  parts and cls / patch per teacher, recomputed with the reference loss on the step's last
  micro-batch (the fused kernels return the per-image total only; two reference passes over
  features already in memory are cheaper than extra kernel outputs on every step); the gradient
  norm of each module group (encoder, each projector) before clipping; the teacher-norm running
  statistics, summarised as their channel means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dune_scale.distill.loss_terms import loss_terms, split_fields, term_keys
from dune_scale.distributed import all_reduce_sum
from dune_scale.telemetry.metrics import finite_or_none


def group_of(name: str) -> str | None:
    """The module group a parameter's gradient norm is reported under (teacher norms have none)."""
    parts = name.split(".")
    if parts[0] == "encoder":
        return "encoder"
    if parts[0] == "projectors":
        return f"projector_{parts[1]}"
    return None


def _full_grad(param: nn.Parameter) -> torch.Tensor | None:
    """This parameter's gradient where the strategy keeps it: ``.grad`` (single; FSDP2 as shards) or,
    under DeepSpeed ZeRO-3, its partition gathered (collective). ZeRO-1/2 fill their partitioned
    gradients only inside the engine's step, so there is none to read before it (None)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return param.grad


class StepDiagnostics:
    """The trainer's diagnostics of one student (``module``: a ``DuneStudent``)."""

    def __init__(self, objective: Any, module: nn.Module) -> None:
        self.objective = objective
        self.groups = sorted({g for name, _ in module.named_parameters() if (g := group_of(name)) is not None})
        self.keys = term_keys(module.teacher_tokens, objective.teacher_names)

    def loss_split(
        self, student_out: Mapping[str, Any], teacher_out: Mapping[str, Any], stats: Mapping[str, Any]
    ) -> torch.Tensor:
        """[pairs, 2] batch-mean weighted cos / smooth-L1 parts of each (teacher, token type)."""
        return loss_terms(student_out, teacher_out, stats, self.objective).mean(dim=-1)

    @torch.no_grad()
    def grad_norms(self, module: nn.Module) -> torch.Tensor:
        """[groups] gradient L2 norm per module group over all ranks, before clipping (device); NaN for
        a group whose gradients the strategy does not expose here (DeepSpeed ZeRO-1/2)."""
        device = _device_of(module)
        sharded = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        whole = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
        seen = torch.zeros(len(self.groups), dtype=torch.bool, device=device)
        index = {g: i for i, g in enumerate(self.groups)}
        for name, param in module.named_parameters():
            group = group_of(name)
            grad = _full_grad(param) if group is not None else None
            if grad is None:
                continue
            seen[index[group]] = True
            if isinstance(grad, DTensor):  # FSDP2: this rank's shard
                sharded[index[group]] += grad.to_local().double().pow(2).sum()
            else:
                whole[index[group]] += grad.double().pow(2).sum()
        norms = (all_reduce_sum(sharded) + whole).sqrt().float()
        return norms.where(seen, torch.full_like(norms, float("nan")))

    def fields(self, pending: Sequence[Mapping[str, torch.Tensor]], module: nn.Module, world_size: int) -> dict[str, float]:
        """Record fields of one logging interval, read at the logging step.

        ``drop_weight_<teacher>``: the teacher's share of the loss weight after teacher dropping
        (interval mean, sums to 1 over teachers); loss split (see :func:`split_fields`) of the last
        step; ``grad_norm_<group>`` of the last step; ``norm_<teacher>_<token>_mean|std``: channel
        means of the running teacher statistics."""
        names = list(self.objective.teacher_names)
        drop = torch.stack([m["drop_weights"] for m in pending]).mean(dim=0)
        last = pending[-1]
        reduced = all_reduce_sum(torch.cat([drop, last["loss_split"].flatten()]).float()) / world_size
        drop_values, split = reduced[: len(names)].tolist(), reduced[len(names) :].view(-1, 2).tolist()
        fields = {f"drop_weight_{name}": value for name, value in zip(names, drop_values)}
        fields.update(split_fields(self.keys, split))
        norms = last["group_grad_norms"].tolist()
        fields.update({f"grad_norm_{g}": finite_or_none(value) for g, value in zip(self.groups, norms)})
        teacher_norms = [(f"norm_{name}_{token}", norm) for name, tokens in module.teacher_norms.items() for token, norm in tokens.items()]
        summary = torch.stack([torch.stack([n.running_mean.mean(), n.running_std.mean()]) for _, n in teacher_norms]).tolist()
        for (prefix, _), (mean, std) in zip(teacher_norms, summary):
            fields[f"{prefix}_mean"], fields[f"{prefix}_std"] = mean, std
        return fields


def _device_of(module: nn.Module) -> torch.device:
    for buffer in module.buffers():
        return buffer.device
    return next(module.parameters()).device
