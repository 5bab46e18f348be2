"""The distillation loss split into its parts, for diagnostics (validation records, training logs).

The training loss only needs the per-image total (the fused kernels return nothing else); to see
*why* a teacher's loss moves, validation and logging steps recompute it from the reference
implementation as its weighted cosine and smooth-L1 parts per token type. Each part calls the
reference loss with the other weight set to zero, so the split is the same formula as the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dune_scale.distill.losses import reference_distill_loss

# The parts of one (teacher, token type) loss, in the order of a terms tensor's second axis.
PARTS = ("cos", "sl1")


def term_keys(teacher_tokens: Mapping[str, Sequence[str]], teacher_names: Sequence[str]) -> list[tuple[str, str]]:
    """The (teacher, token type) pairs a student predicts, in its output order (``teacher_tokens``:
    a student's ``teacher_tokens`` or its output mapping)."""
    return [(name, token) for name in teacher_names for token in teacher_tokens[name]]


@torch.no_grad()
def loss_terms(
    student_out: Mapping[str, Mapping[str, torch.Tensor]],
    teacher_out: Mapping[str, Mapping[str, torch.Tensor]],
    stats: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    objective: Any,
) -> torch.Tensor:
    """[pairs of :func:`term_keys`, 2 (weighted cos, weighted smooth-L1), B] per-image parts, fp32.

    ``objective`` supplies teacher_names, norm_eps, w_cos, w_sl1 and beta (a ``DistillObjective``);
    cos + sl1 of a pair is that pair's per-image loss exactly.
    """
    rows = []
    for name, token in term_keys(student_out, objective.teacher_names):
        mean, std = stats[name][token]
        args = (student_out[name][token], teacher_out[name][token], mean, std)
        common = {"eps": objective.norm_eps, "beta": objective.beta}
        cos = reference_distill_loss(*args, w_cos=objective.w_cos, w_sl1=0.0, **common)
        sl1 = reference_distill_loss(*args, w_cos=0.0, w_sl1=objective.w_sl1, **common)
        rows.append(torch.stack([cos, sl1]))
    return torch.stack(rows)


def split_fields(keys: Sequence[tuple[str, str]], means: Sequence[Sequence[float]]) -> dict[str, float]:
    """Record fields from the mean parts of each pair (``means[i] = [cos, sl1]`` of ``keys[i]``).

    ``loss_<teacher>_<cls|patch>`` is one token type's loss; ``loss_<teacher>_cos`` and
    ``loss_<teacher>_sl1`` are the parts averaged over the teacher's token types, so that
    ``loss_<teacher> = loss_<teacher>_cos + loss_<teacher>_sl1`` (the token types are averaged).
    """
    fields: dict[str, float] = {}
    by_teacher: dict[str, list[Sequence[float]]] = {}
    for (name, token), (cos, sl1) in zip(keys, means):
        fields[f"loss_{name}_{token}"] = cos + sl1
        by_teacher.setdefault(name, []).append((cos, sl1))
    for name, parts in by_teacher.items():
        for i, part in enumerate(PARTS):
            fields[f"loss_{name}_{part}"] = sum(p[i] for p in parts) / len(parts)
    return fields
