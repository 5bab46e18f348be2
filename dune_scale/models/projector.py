"""DUNE's transformer projector: student tokens → one teacher's feature space."""

from __future__ import annotations

import torch
from torch import nn

from dune_scale.models.vit import Block, init_linear_trunc_normal


class TransformerProjector(nn.Module):
    """Pre-norm ViT block(s) at the student width, then a linear map to the teacher width.

    A block (rather than an MLP) lets each head mix tokens, which DUNE found matters for dense
    teachers such as MASt3R.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_heads: int,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        layerscale_init: float | None = 1e-4,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(in_dim, num_heads, mlp_ratio=mlp_ratio, layerscale_init=layerscale_init, attention=attention)
            for _ in range(depth)
        )
        self.head = nn.Linear(in_dim, out_dim)
        self.apply(init_linear_trunc_normal)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens)

