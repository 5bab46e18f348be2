"""The distillation objective of one step: standardise teachers, per-image losses, teacher dropping."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dune_scale.distill.dropping import drop_coefficients
from dune_scale.distill.teacher_norm import global_mean_std

# teacher → token type → (mean, std) used to standardise that teacher's features this step.
Stats = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
# (student, teacher, mean, std, eps=, w_cos=, w_sl1=, beta=) → per-image loss (B,): DESIGN §4's signature.
LossFn = Callable[..., torch.Tensor]


def batch_statistics(teacher_outs: Sequence[Mapping[str, Mapping[str, torch.Tensor]]]) -> Stats:
    """The standardisation statistics of one optimizer step: over all its micro-batches (and ranks),
    so gradient accumulation standardises exactly like one large batch. They are the teachers'
    property: computed once per step and shared by every student trained on that teacher pass."""
    return {
        name: {token: global_mean_std([out[name][token] for out in teacher_outs]) for token in tokens}
        for name, tokens in teacher_outs[0].items()
    }


@torch.no_grad()
def update_running_statistics(teacher_norms: nn.ModuleDict, stats: Stats, momentum: float) -> None:
    """Move one student's running statistics (kept for evaluation and export) towards ``stats``."""
    for name, tokens in stats.items():
        for token, (mean, std) in tokens.items():
            teacher_norms[name][token].update(mean, std, momentum)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    per_image: torch.Tensor  # [teachers, B], detached
    coefficients: torch.Tensor  # [teachers, B], detached

    def per_teacher(self) -> torch.Tensor:
        """Batch-mean loss of each teacher (before dropping), for metrics."""
        return self.per_image.mean(dim=1)


@dataclass
class DistillObjective:
    """Every setting comes from the config (``distill.*``, ``loss.*``): no second set of defaults.
    ``loss_fn`` is chosen at construction: the fused entry point or the torch reference."""

    teacher_names: Sequence[str]
    teacher_domains: Sequence[str]
    drop_method: str
    drop_p: float
    generic_domain: str
    drop_normalise: str
    norm_eps: float
    w_cos: float
    w_sl1: float
    beta: float
    loss_fn: LossFn
    world_size: int

    def teacher_statistics(
        self,
        teacher_outs: Sequence[Mapping[str, Mapping[str, torch.Tensor]]],
        teacher_norms: nn.ModuleDict,
        momentum: float,
    ) -> Stats:
        """Standardisation statistics of one optimizer step: over all its micro-batches (and ranks),
        so gradient accumulation standardises exactly like one large batch; the running statistics
        are updated once per step."""
        return {
            name: {
                token: teacher_norms[name][token].stats([out[name][token] for out in teacher_outs], momentum)
                for token in teacher_outs[0][name]
            }
            for name in self.teacher_names
        }

    def __call__(
        self,
        student_out: Mapping[str, Mapping[str, torch.Tensor]],
        teacher_out: Mapping[str, Mapping[str, torch.Tensor]],
        stats: Stats,
        sample_domains: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> ObjectiveOutput:
        rows = []
        for name in self.teacher_names:
            token_losses = []
            for token, prediction in student_out[name].items():
                mean, std = stats[name][token]
                token_losses.append(
                    self.loss_fn(
                        prediction, teacher_out[name][token], mean, std,
                        eps=self.norm_eps, w_cos=self.w_cos, w_sl1=self.w_sl1, beta=self.beta,
                    )
                )
            rows.append(torch.stack(token_losses).mean(dim=0))
        per_image = torch.stack(rows)
        coefficients = drop_coefficients(
            per_image, self.drop_method, self.drop_p, generator,
            teacher_domains=self.teacher_domains, sample_domains=sample_domains, generic_domain=self.generic_domain,
            normalise=self.drop_normalise, world_size=self.world_size,
        )
        loss = (coefficients * per_image).sum()
        return ObjectiveOutput(loss=loss, per_image=per_image.detach(), coefficients=coefficients)
