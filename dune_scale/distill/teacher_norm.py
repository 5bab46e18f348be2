"""Teacher-feature standardisation ("teacher norm") with running statistics.

Teachers differ in feature scale by orders of magnitude; DUNE standardises each teacher's features
per channel before the loss. Training uses the statistics of the *global* batch (all ranks), and
keeps an exponential moving average for evaluation. The average follows BatchNorm's convention:
``running = (1 − m)·running + m·batch``, with m decaying 1.0 → 0.001 (cosine) over training, so the
running statistics start as the first batch's and settle as training goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dune_scale.distributed import all_reduce_sum


def global_mean_std(pieces: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std over every row of ``pieces`` (…, D), on all ranks.

    ``pieces`` may be one tensor or the micro-batches of an accumulated step (the statistics are
    then those of the whole step, as with one large batch). Each piece is reduced in fp32
    (``var_mean`` is numerically stable); pieces and ranks are merged with Chan's parallel formula
    in fp64, which stays exact for tens of millions of tokens where a sum of squares would not.
    """
    pieces = [pieces] if isinstance(pieces, torch.Tensor) else list(pieces)
    counts, means, m2s = [], [], []
    for piece in pieces:
        rows = piece.reshape(-1, piece.shape[-1]).float()
        var, mean = torch.var_mean(rows, dim=0, correction=0)
        counts.append(float(rows.shape[0]))
        means.append(mean.double())
        m2s.append(var.double() * rows.shape[0])
    # torch.full, not torch.tensor: a fill kernel, where a host→device copy would wait for the GPU.
    total = all_reduce_sum(torch.full((1,), sum(counts), device=means[0].device, dtype=torch.float64))
    mean = all_reduce_sum(sum(n * m for n, m in zip(counts, means))) / total
    m2 = all_reduce_sum(sum(m2 + n * (m - mean) ** 2 for n, m, m2 in zip(counts, means, m2s)))
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
    def stats(self, features: torch.Tensor | Sequence[torch.Tensor], momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: statistics of the global batch, i.e. of every micro-batch of the step on every
        rank (and the running ones updated once); eval: the running ones."""
        if not self.training:
            return self.running_mean, self.running_std
        mean, std = global_mean_std(features)
        self.update(mean, std, momentum)
        return mean, std
