"""The CroCo / DUSt3R / MASt3R image encoder (MASt3R's ViT-L/16), self-contained.

Patch embedding 16×16, no class token and no absolute positional embedding: positions enter through
2D rotary embeddings (RoPE, frequency base 100) on queries and keys. Pre-norm blocks without layer
scale, final ``enc_norm``. Module names match the checkpoint's ``patch_embed.*``, ``enc_blocks.<i>.*``
and ``enc_norm.*`` keys, so the encoder part of a MASt3R checkpoint loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from dune_scale.models.attention import attention as scaled_dot_product_attention
from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from dune_scale.models.vit import Attention, Block, PatchEmbed


def rope_2d_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) in fp32 for integer ``positions`` (N, 2) = (y, x).

    CroCo's RoPE2D: the first half of each head is rotated by the row, the second by the column;
    inside a half of size h, channel j pairs with j + h/2 (rotate-half) at angle
    pos · base^(−j / (h/2)).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = base ** (-torch.arange(quarter, device=positions.device, dtype=torch.float32) / quarter)
    angles_y = positions[:, :1].float() * inv_freq
    angles_x = positions[:, 1:].float() * inv_freq
    angles = torch.cat([angles_y, angles_y, angles_x, angles_x], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, N, d): each quarter pair (u, v) → (u cos − v sin, v cos + u sin)."""
    u_y, v_y, u_x, v_x = x.chunk(4, dim=-1)
    rotated = torch.cat([-v_y, u_y, -v_x, u_x], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RopeAttention(Attention):
    """Self-attention with 2D RoPE on q and k (not v); the same qkv/proj parameters as ViT attention."""

    def __init__(self, dim: int, num_heads: int, rope_base: float = 100.0, attention: str = "auto") -> None:
        super().__init__(dim, num_heads, qkv_bias=True, attention=attention)
        self.rope_base = rope_base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        # Integer positions (not float tables) cross the block boundary, so wrappers that cast
        # floating inputs (FSDP mixed precision) cannot round the rotation angles.
        cos, sin = rope_2d_tables(positions, q.shape[-1], self.rope_base)
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        return self.merge_heads(scaled_dot_product_attention(q, k, v, self.attention))


def patch_positions(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows·cols, 2) integer (y, x) of each patch, row-major (y slowest), starting at 0."""
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=-1)


class CrocoEncoder(nn.Module):
    """MASt3R's encoder; ``forward_features`` takes ImageNet-normalised images like every teacher."""

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        patch_size: int = 16,
        img_size: int | tuple[int, int] = 512,
        mlp_ratio: float = 4.0,
        rope_base: float = 100.0,
        norm_eps: float = 1e-6,
        attention: str = "auto",
    ) -> None:
        """``img_size`` only records the training resolution (RoPE has no table): any input whose
        sides are multiples of the patch size, portrait included, is accepted, as in MASt3R."""
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.img_size = img_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.enc_blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                layerscale_init=None,
                norm_eps=norm_eps,
                attn=RopeAttention(embed_dim, num_heads, rope_base, attention),
            )
            for _ in range(depth)
        )
        self.enc_norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    @property
    def blocks(self) -> nn.ModuleList:
        """Same name as the ViT's, for per-block sharding / checkpointing."""
        return self.enc_blocks

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """ImageNet-normalised images → MASt3R features; ``cls`` is the token mean (a pseudo class token)."""
        # MASt3R normalises with mean = std = 0.5; undo ImageNet's first (in fp32: it is pixel data).
        # Python-float constants per channel: no host→device copy (which would wait for the GPU).
        pixels = images.float()
        x = torch.stack(
            [(pixels[:, c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] - 0.5) / 0.5 for c in range(3)], dim=1
        ).to(images.dtype)
        _, _, height, width = x.shape
        tokens = self.patch_embed(x)
        positions = patch_positions(height // self.patch_size, width // self.patch_size, x.device)
        for block in self.enc_blocks:
            tokens = block(tokens, positions=positions)
        patch = self.enc_norm(tokens)
        return {"cls": patch.mean(dim=1), "patch": patch, "reg": None}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)
