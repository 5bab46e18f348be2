"""The CroCo / DUSt3R / MASt3R image encoder (MASt3R's ViT-L/16), self-contained.

Patch embedding 16×16, no class token and no absolute positional embedding: positions enter through
2D rotary embeddings (RoPE, frequency base 100) on queries and keys. Pre-norm blocks without layer
scale, final ``enc_norm``. Module names match the checkpoint's ``enc_blocks.<i>.*`` keys.
"""

from __future__ import annotations

import torch
from torch import nn

from dune_scale.models.attention import attention
from dune_scale.models.vit import Attention, Block, PatchEmbed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rope_1d(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE on the last dim of ``x`` (B, H, N, d) by integer ``positions`` (B, N):
    channel j pairs with j + d/2, angle = position · base^(−j / (d/2))."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, N, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def rope_2d(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """First half of each head rotated by the row (y), second half by the column (x)."""
    by_row, by_col = x.chunk(2, dim=-1)
    return torch.cat([rope_1d(by_row, positions[..., 0], base), rope_1d(by_col, positions[..., 1], base)], dim=-1)


class RopeAttention(Attention):
    def __init__(self, dim: int, num_heads: int, rope_base: float = 100.0) -> None:
        super().__init__(dim, num_heads, qkv_bias=True)
        self.rope_base = rope_base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        q, k = rope_2d(q, positions, self.rope_base), rope_2d(k, positions, self.rope_base)
        return self.merge_heads(attention(q, k, v))


def patch_positions(batch: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(B, rows·cols, 2) integer (y, x) of each patch, row-major."""
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1).expand(batch, -1, -1)


class CrocoEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        patch_size: int = 16,
        mlp_ratio: float = 4.0,
        rope_base: float = 100.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.enc_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, layerscale_init=None, norm_eps=norm_eps,
                  attn=RopeAttention(embed_dim, num_heads, rope_base))
            for _ in range(depth)
        )
        self.enc_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """Same name as the ViT's, for per-block sharding / checkpointing."""
        return self.enc_blocks

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """ImageNet-normalised images → MASt3R features; ``cls`` is the token mean (a pseudo class token)."""
        mean, std = self.imagenet_mean.to(images.dtype), self.imagenet_std.to(images.dtype)
        x = ((images * std + mean) - 0.5) / 0.5  # MASt3R's own normalisation
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        positions = patch_positions(batch, height // self.patch_size, width // self.patch_size, x.device)
        for block in self.enc_blocks:
            tokens = block(tokens, positions=positions)
        patch = self.enc_norm(tokens)
        return {"cls": patch.mean(dim=1), "patch": patch, "reg": None}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)
