"""Teacher-feature standardisation ("teacher norm") with running statistics.

Teachers differ in feature scale by orders of magnitude; DUNE standardises each teacher's features
per channel before the loss. Training uses the statistics of the *global* batch (all ranks), and
keeps an exponential moving average for evaluation. The average follows BatchNorm's convention:
``running = (1 − m)·running + m·batch``, with m decaying 1.0 → 0.001 (cosine) over training, so the
running statistics start as the first batch's and settle as training goes on.
"""

from __future__ import annotations

import torch
from torch import nn

from dune_scale.distributed import all_reduce_sum


def global_mean_std(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std over every row of ``features`` (…, D) on all ranks.

    Each rank reduces its rows in fp32 (``var_mean`` is numerically stable); ranks are then merged
    with Chan's parallel formula in fp64, which stays exact for tens of millions of tokens where a
    sum of squares in fp32 would not.
    """
    rows = features.reshape(-1, features.shape[-1]).float()
    local_var, local_mean = torch.var_mean(rows, dim=0, correction=0)
    count = torch.tensor([float(rows.shape[0])], device=rows.device, dtype=torch.float64)
    local_mean, local_m2 = local_mean.double(), local_var.double() * count
    total = all_reduce_sum(count.clone())
    mean = all_reduce_sum(local_mean * count) / total
    m2 = all_reduce_sum(local_m2 + count * (local_mean - mean) ** 2)
    var = m2 / (total - 1).clamp_min(1.0)
    return mean.float(), var.sqrt().float()


class TeacherNorm(nn.Module):
    """Running per-channel statistics of one teacher's features of one token type."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_std", torch.ones(dim))

    @torch.no_grad()
    def update(self, mean: torch.Tensor, std: torch.Tensor, momentum: float) -> None:
        self.running_mean.lerp_(mean.to(self.running_mean), momentum)
        self.running_std.lerp_(std.to(self.running_std), momentum)

    @torch.no_grad()
    def stats(self, features: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: global batch statistics (and the running ones updated); eval: running ones."""
        if not self.training:
            return self.running_mean, self.running_std
        mean, std = global_mean_std(features)
        self.update(mean, std, momentum)
        return mean, std
