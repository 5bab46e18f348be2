"""Teacher dropping (UNIC): which (teacher, image) losses count, and with what weight.

- ``none``: every (teacher, image) pair counts.
- ``lowest_loss``: per image, every teacher but the one with the highest loss is dropped with
  probability p (the hardest teacher always trains).
- ``own_data``: an image trains only the teacher(s) of its dataset's domain.
- ``own+generic_data``: as ``own_data``, and images of the generic domain train every teacher.
An image whose domain no teacher owns trains every teacher (it is generic by construction).

Every method returns detached coefficients of shape [teachers, B], normalised as
``distill.drop_normalise`` says; the strategies then average the ranks' gradients, as DDP does:

- ``per_rank`` (naver/dune): divided by this rank's kept count, so they sum to one over each rank's
  batch (a rank that kept fewer pairs weighs each of them more). With gradient accumulation, each
  micro-batch is normalised on its own, as a rank of a larger job would be.
- ``global``: divided by the global kept count and multiplied by the world size, so that after the
  average every kept pair of the ranks' micro-batches weighs the same, whatever each rank kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dune_scale.distributed import all_reduce_sum

DROP_METHODS = ("none", "lowest_loss", "own_data", "own+generic_data")
DROP_NORMALISATIONS = ("per_rank", "global")


def ownership_mask(
    teacher_domains: Sequence[str], sample_domains: Sequence[str], generic_domain: str | None, device: torch.device
) -> torch.Tensor:
    """[teachers, B] bool: does teacher t learn from sample b under the own-data rules."""
    owned = {d for d in teacher_domains}
    rows = []
    for teacher_domain in teacher_domains:
        rows.append(
            [
                domain == teacher_domain or domain not in owned or (generic_domain is not None and domain == generic_domain)
                for domain in sample_domains
            ]
        )
    mask = torch.tensor(rows, dtype=torch.bool)
    # From pinned memory the copy is asynchronous: no wait for the GPU's queued work.
    return mask.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else mask


def drop_coefficients(
    losses: torch.Tensor,
    method: str,
    p: float,
    generator: torch.Generator | None,
    teacher_domains: Sequence[str],
    sample_domains: Sequence[str],
    generic_domain: str,
    normalise: str,
    world_size: int,
) -> torch.Tensor:
    """Detached [teachers, B] loss weights for ``losses`` [teachers, B], normalised over this rank's
    batch (``per_rank``) or over the global batch of ``world_size`` ranks (``global``)."""
    losses = losses.detach()
    if method == "none":
        keep = torch.ones_like(losses, dtype=torch.bool)
    elif method == "lowest_loss":
        draws = torch.rand(losses.shape, generator=generator, device=losses.device)
        keep = draws >= p
        hardest = losses.argmax(dim=0, keepdim=True)
        keep.scatter_(0, hardest, True)
    elif method in ("own_data", "own+generic_data"):
        generic = generic_domain if method == "own+generic_data" else None
        keep = ownership_mask(teacher_domains, sample_domains, generic, losses.device)
    else:
        raise ValueError(f"unknown teacher-dropping method {method!r}; choose one of {', '.join(DROP_METHODS)}")
    weights = keep.to(losses.dtype)
    if normalise == "per_rank":
        return weights / weights.sum().clamp_min(1.0)
    if normalise != "global":
        raise ValueError(f"unknown normalisation {normalise!r}; choose one of {', '.join(DROP_NORMALISATIONS)}")
    kept_globally = all_reduce_sum(weights.sum().reshape(1)).clamp_min(1.0)
    return weights * (world_size / kept_globally)
