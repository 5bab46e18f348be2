"""DINOv2-style Vision Transformer: the DUNE student, and the DINOv2 / Multi-HMR teachers.

Module names follow the DINOv2 release (``blocks.<i>.attn.qkv``, ``ls1.gamma`` …) so official
checkpoints load without renaming. Positional embeddings are resampled on the fly exactly as the
DINOv2 model class does (bicubic by scale factors with an offset of 0.1, no antialias, height
first), which is what the teachers were trained and distilled with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.models.attention import attention as scaled_dot_product_attention
from dune_scale.models.attention import check_attention_backend
from dune_scale.models.derived import DerivedCache


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → tokens (a strided conv with bias, as DINOv2 and CroCo)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(
        self, images: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) → contiguous (B, H/p · W/p, D), row-major (y slowest). ``weight``/``bias``
        replace the conv's own (MASt3R's with its input renormalisation folded in).

        Contiguous, because elementwise ops keep their first input's layout: an encoder that
        prepends no token (CroCo) would otherwise carry the conv's channel-major layout through
        its whole residual stream, every LayerNorm copying it and every residual add running
        strided (on an H200, MASt3R's eager forward spent 79 ms in elementwise kernels against
        DINOv2's 47, which prepends tokens)."""
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        maps = self.proj(images) if weight is None else F.conv2d(images, weight, bias, stride=self.patch_size)
        return maps.flatten(2).transpose(1, 2).contiguous()


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2, the FFN of DINOv2 and CroCo blocks."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale; the parameter is named ``gamma`` as in the DINOv2 release."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q | k | v], heads contiguous)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attention: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention = check_attention_backend(attention)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) → q, k, v as (B, heads, N, d); shared with the RoPE attention of CroCo."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(scaled_dot_product_attention(q, k, v, self.attention))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (DINOv2 names).

    ``attn`` replaces the plain attention (CroCo's RoPE attention); ``forward``'s keyword arguments
    are handed to it (token positions there).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float | None = 1e-4,
        norm_eps: float = 1e-6,
        attn: nn.Module | None = None,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn if attn is not None else Attention(dim, num_heads, qkv_bias, attention)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), **attn_kwargs))
        return x + self.ls2(self.mlp(self.norm2(x)))


def resample_pos_embed(
    pos_embed: torch.Tensor, rows: int, cols: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """(1, 1+M², D) table → (1, 1+rows·cols, D) by DINOv2's rule (bicubic; with an ``offset`` the
    scale factors (rows + offset)/M, (cols + offset)/M decide the source coordinates, else the target
    size); the class position is kept. The one resampling of the project: forward passes at another
    resolution and stage-2 initialisation from a lower-resolution checkpoint both use it."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    pos = pos_embed.float()
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        # Scale factors (not a target size) decide the source coordinates: (i + 0.5) / s − 0.5.
        scale = ((rows + offset) / side, (cols + offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=antialias)
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"positional embedding resampled to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
    return torch.cat([pos[:, :1], grid], dim=1).to(pos_embed.dtype)


def pos_embed_for_grid(
    pos_embed: torch.Tensor, rows: int, cols: int, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """The table a ``rows`` × ``cols`` token grid uses (DINOv2's rule): the stored one at its own
    square grid, else :func:`resample_pos_embed`. Forward passes, exported students at another
    resolution and the ONNX graph's run-time resampling (checked against it) all follow it."""
    if rows == cols == math.isqrt(pos_embed.shape[1] - 1):
        return pos_embed
    return resample_pos_embed(pos_embed, rows, cols, offset, antialias)


def init_linear_trunc_normal(module: nn.Module) -> None:
    """DINOv2/timm init for training from scratch: trunc-normal(0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """DINOv2 ViT: ``[cls, registers, patches]``, pre-norm blocks, final LayerNorm.

    Built for ``img_size`` (the positional table is (img_size/p)² + 1), any input whose sides are
    multiples of the patch size works through positional-embedding resampling.
    ``with_mask_token`` adds DINOv2's (inference-unused) ``mask_token`` so release checkpoints load
    strictly; the student leaves it out so it has no parameter without gradient.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float | None = 1e-4,
        num_register_tokens: int = 4,
        norm_eps: float = 1e-6,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        with_mask_token: bool = False,
        attention: str = "auto",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        if with_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layerscale_init, norm_eps, attention=attention)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # Frozen teachers resample their positional embedding once per input grid (DINOv2-L pays a
        # bicubic pass over the table on every forward otherwise); training students never cache.
        self._derived = DerivedCache()
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init for training from scratch (skipped on the meta device: nothing to fill)."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(init_linear_trunc_normal)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int) -> torch.Tensor:
        """The (1, 1+N, D) positional embedding for a ``height`` × ``width`` pixel input
        (:func:`pos_embed_for_grid`: as stored at the native square grid, else resampled
        bicubically by scale factors (H/p + offset)/M, (W/p + offset)/M)."""
        rows, cols = height // self.patch_size, width // self.patch_size
        return self._derived.get(("pos_embed", rows, cols), [self.pos_embed], lambda: self._resample_pos_embed(height, width))

    def _resample_pos_embed(self, height: int, width: int) -> torch.Tensor:
        rows, cols = height // self.patch_size, width // self.patch_size
        return pos_embed_for_grid(self.pos_embed, rows, cols, self.interpolate_offset, self.interpolate_antialias)

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[cls, registers, patches]; registers are inserted after the positional embedding."""
        _, _, height, width = images.shape
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, height, width)
        if self.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block, before the final norm: (B, 1 + R + N, D)."""
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Final-normed tokens split into ``cls`` (B, D), ``patch`` (B, N, D), ``reg`` (B, R, D) or None."""
        x = self.norm(self.forward_tokens(images))
        registers = x[:, 1 : self.num_prefix_tokens] if self.num_register_tokens else None
        return {"cls": x[:, 0], "patch": x[:, self.num_prefix_tokens :], "reg": registers}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)


# The named encoders: (width, depth, heads). The one table of their shapes (the config's
# student.arch, building, and export, which reads a width and depth back as a name).
NAMED_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),  # ViT-S/14, the DUNE students
    "vit_base": (768, 12, 12),  # ViT-B/14
    "vit_large": (1024, 24, 16),  # ViT-L/14, the DINOv2 / Multi-HMR teachers
}


def named_vit(arch: str, **kwargs: Any) -> VisionTransformer:
    """The encoder :data:`NAMED_ARCHS` names (keyword arguments override anything)."""
    embed_dim, depth, num_heads = NAMED_ARCHS[arch]
    return VisionTransformer(**{"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **kwargs})


def vit_small(**kwargs: Any) -> VisionTransformer:
    """ViT-S/14: 384 wide, 12 blocks, 6 heads."""
    return named_vit("vit_small", **kwargs)


def vit_base(**kwargs: Any) -> VisionTransformer:
    """ViT-B/14: 768 wide, 12 blocks, 12 heads."""
    return named_vit("vit_base", **kwargs)


def vit_large(**kwargs: Any) -> VisionTransformer:
    """ViT-L/14: 1024 wide, 24 blocks, 16 heads."""
    return named_vit("vit_large", **kwargs)
