"""The CroCo / DUSt3R / MASt3R image encoder (MASt3R's ViT-L/16), self-contained.

Patch embedding 16×16, no class token and no absolute positional embedding: positions enter through
2D rotary embeddings (RoPE, frequency base 100) on queries and keys. Pre-norm blocks without layer
scale, final ``enc_norm``. Module names match the checkpoint's ``patch_embed.*``, ``enc_blocks.<i>.*``
and ``enc_norm.*`` keys, so the encoder part of a MASt3R checkpoint loads strictly.

Frozen inference at full speed: the RoPE tables are built once per token grid (not per block and
forward), the rotation of q and k is one fused kernel on CUDA (``kernels.rope_2d``; inside a
``torch.compile`` graph the compiler fuses the eager formula), and the ImageNet → 0.5/0.5 input
renormalisation is folded into the patch-embedding weights (an exact affine identity: the conv
has no padding) instead of a pass over the images. Derived values are cached per module and
recomputed when the weights change (``DerivedCache``).
"""

from __future__ import annotations

import torch
from torch import nn

from dune_scale.models.attention import attention as scaled_dot_product_attention
from dune_scale.models.derived import DerivedCache
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
    """Rotate (B, heads, N, d): each quarter pair (u, v) → (u cos − v sin, v cos + u sin), in fp32
    (as CroCo's fp32 tables promote it under autocast), returned in ``x``'s dtype."""
    u_y, v_y, u_x, v_x = x.float().chunk(4, dim=-1)
    rotated = torch.cat([-v_y, u_y, -v_x, u_x], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def rotate_queries_keys(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE on q and k: the fused Triton kernel for frozen CUDA inference, else the eager formula
    (CPU, autograd, and inside ``torch.compile``, which fuses it itself)."""
    frozen = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    if q.is_cuda and frozen and not torch.compiler.is_compiling() and q.shape[-1] & (q.shape[-1] - 1) == 0:
        from kernels import triton_available

        if triton_available():
            from kernels.rope_2d import triton_rope_2d

            return triton_rope_2d(q, k, cos, sin)
    return apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)


class RopeAttention(Attention):
    """Self-attention with 2D RoPE on q and k (not v); the same qkv/proj parameters as ViT attention."""

    def __init__(self, dim: int, num_heads: int, rope_base: float = 100.0, attention: str = "auto") -> None:
        super().__init__(dim, num_heads, qkv_bias=True, attention=attention)
        self.rope_base = rope_base

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``rope``: the (cos, sin) tables of the token grid (``rope_2d_tables``), shared by every
        block. Under an FSDP bf16 policy they arrive cast to bf16, the precision the rotation had
        before it ran in fp32."""
        q, k, v = self.split_heads(x)
        q, k = rotate_queries_keys(q, k, *rope)
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
        self.rope_base = rope_base
        self._derived = DerivedCache()

    @property
    def blocks(self) -> nn.ModuleList:
        """Same name as the ViT's, for per-block sharding / checkpointing."""
        return self.enc_blocks

    def rope_tables(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 (cos, sin) of a rows × cols grid, built once per grid and device."""
        head_dim = self.embed_dim // self.num_heads
        return self._derived.get(
            ("rope", rows, cols, device), [],
            lambda: rope_2d_tables(patch_positions(rows, cols, device), head_dim, self.rope_base),
        )

    def renormalising_patch_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-embedding (weight, bias) that take ImageNet-normalised images directly.

        MASt3R normalises with mean = std = 0.5: x' = x·2σ_c + (2μ_c − 1) per channel c. The conv
        has no padding, so conv(x') = conv'(x) with W'[:, c] = W[:, c]·2σ_c and
        b' = b + Σ_c (2μ_c − 1) Σ_{kh,kw} W[:, c] (computed in fp64, stored in the weights' dtype).
        """
        proj = self.patch_embed.proj

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            weight = proj.weight.detach().double()
            scale = torch.tensor([2 * s for s in IMAGENET_STD], dtype=torch.float64, device=weight.device)
            shift = torch.tensor([2 * m - 1 for m in IMAGENET_MEAN], dtype=torch.float64, device=weight.device)
            folded_weight = weight * scale[None, :, None, None]
            folded_bias = proj.bias.detach().double() + (weight.sum(dim=(2, 3)) * shift).sum(dim=1)
            return folded_weight.to(proj.weight.dtype), folded_bias.to(proj.bias.dtype)

        return self._derived.get("renormalising_patch_embedding", [proj.weight, proj.bias], fold)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """ImageNet-normalised images → MASt3R features; ``cls`` is the token mean (a pseudo class token)."""
        _, _, height, width = images.shape
        tokens = self.patch_embed(images, *self.renormalising_patch_embedding())
        rope = self.rope_tables(height // self.patch_size, width // self.patch_size, images.device)
        for block in self.enc_blocks:
            tokens = block(tokens, rope=rope)
        patch = self.enc_norm(tokens)
        return {"cls": patch.mean(dim=1), "patch": patch, "reg": None}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return self.forward_features(images)
