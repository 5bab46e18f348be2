"""The DINOv2-style ViT as the DUNE student: sizes, token layout, init, positional-embedding
resampling, and the attention backends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dune_scale.models import attention as attn_mod
from dune_scale.models.vit import Block, VisionTransformer, vit_base, vit_large, vit_small


def _student_params(dim: int, depth: int, grid: int, registers: int = 4) -> int:
    """Per block: norm1 2D, qkv 3D²+3D, proj D²+D, ls1 D, norm2 2D, fc1 4D²+4D, fc2 4D²+D, ls2 D
    = 12D² + 15D. Patch embed 3·14²·D + D, pos (1+grid²)·D, cls D, registers R·D, final norm 2D."""
    return depth * (12 * dim * dim + 15 * dim) + 3 * 14 * 14 * dim + dim + (1 + grid * grid) * dim + dim + registers * dim + 2 * dim


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_student_parameter_counts() -> None:
    with torch.device("meta"):
        small = {size: _count(vit_small(img_size=size)) for size in (336, 448, 518)}
        base = {size: _count(vit_base(img_size=size)) for size in (336, 448, 518)}
    # ViT-S/14: blocks 12·(12·384² + 15·384) = 21,302,784; patch 3·196·384 + 384 = 226,176;
    # cls + 4 registers + norm = 384 + 1,536 + 768 = 2,688; pos (1 + g²)·384:
    #   336 px (24²): 221,568 → 21,753,216;  448 px (32²): 393,600 → 21,925,248;
    #   518 px (37², DINOv2's released table): 526,080 → 22,057,728 (≈ 22.06M, the known ViT-S/14 reg4).
    assert small == {336: 21_753_216, 448: 21_925_248, 518: 22_057_728}
    assert small == {size: _student_params(384, 12, size // 14) for size in small}
    # ViT-B/14: blocks 12·(12·768² + 15·768) = 85,072,896; patch 3·196·768 + 768 = 452,352;
    # cls + 4 registers + norm = 768 + 3,072 + 1,536 = 5,376; pos (1 + g²)·768:
    #   336: 443,136 → 85,973,760;  448: 787,200 → 86,317,824;  518: 1,052,160 → 86,582,784 (≈ 86.6M).
    assert base == {336: 85_973_760, 448: 86_317_824, 518: 86_582_784}
    assert base == {size: _student_params(768, 12, size // 14) for size in base}


@pytest.mark.parametrize("factory, dim, heads", [(vit_small, 384, 6), (vit_base, 768, 12), (vit_large, 1024, 16)])
@pytest.mark.parametrize("size", [336, 448])
def test_output_shapes(factory, dim: int, heads: int, size: int) -> None:
    grid = size // 14
    with torch.device("meta"):
        model = factory(img_size=size)
        tokens = model.forward_tokens(torch.empty(2, 3, size, size))
        out = model.forward_features(torch.empty(2, 3, size, size))
    assert (model.embed_dim, model.num_heads, model.patch_size, model.num_prefix_tokens) == (dim, heads, 14, 5)
    assert tokens.shape == (2, 1 + 4 + grid * grid, dim)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"cls": (2, dim), "patch": (2, grid * grid, dim), "reg": (2, 4, dim)}


def test_module_names_match_the_dinov2_release() -> None:
    with torch.device("meta"):
        model = VisionTransformer(img_size=28, embed_dim=8, depth=2, num_heads=2)
        teacher = VisionTransformer(img_size=28, embed_dim=8, depth=1, num_heads=2, with_mask_token=True)
    assert isinstance(model.blocks, nn.ModuleList) and all(type(b) is Block for b in model.blocks)
    keys = set(model.state_dict())
    assert {"cls_token", "pos_embed", "register_tokens", "patch_embed.proj.weight", "norm.weight"} <= keys
    assert {k[len("blocks.0.") :] for k in keys if k.startswith("blocks.0.")} == {
        f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
    } | {"ls1.gamma", "ls2.gamma"}
    assert "mask_token" not in keys and teacher.mask_token.shape == (1, 8)  # the student has no unused parameter
    assert not hasattr(VisionTransformer(img_size=28, embed_dim=8, depth=1, num_heads=2, num_register_tokens=0), "register_tokens")
    plain = Block(8, 2, layerscale_init=None)
    assert isinstance(plain.ls1, nn.Identity) and isinstance(plain.ls2, nn.Identity)


def test_init_for_training_from_scratch() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=56, embed_dim=64, depth=2, num_heads=4)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in linears)
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert abs(weights.std().item() - 0.02) < 1e-3
    assert abs(model.pos_embed.std().item() - 0.02) < 2e-3
    assert model.cls_token.abs().max().item() < 1e-5 and model.register_tokens.abs().max().item() < 1e-5
    assert all(torch.all(b.ls1.gamma == 1e-4) and torch.all(b.ls2.gamma == 1e-4) for b in model.blocks)


def test_forward_tokens_are_forward_features_before_the_final_norm() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=4).eval()
    images = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        tokens = model.forward_tokens(images)
        features = model.forward_features(images)
        normed = model.norm(tokens)
    assert tokens.shape == (2, 1 + 4 + 3 * 4, 32)
    torch.testing.assert_close(features["cls"], normed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(features["reg"], normed[:, 1:5], rtol=0, atol=0)
    torch.testing.assert_close(features["patch"], normed[:, 5:], rtol=0, atol=0)


def _bicubic_matrix(size_in: int, size_out: int, scale: float) -> torch.Tensor:
    """(out, in) PyTorch bicubic (a = −0.75, align_corners=False) by a scale factor, written out:
    source coordinate (i + 0.5)/scale − 0.5, four taps clamped to the border."""
    a = -0.75

    def weight(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        source = (i + 0.5) / scale - 0.5
        for tap in range(math.floor(source) - 1, math.floor(source) + 3):
            matrix[i, min(max(tap, 0), size_in - 1)] += weight(source - tap)
    return matrix


def test_positional_embedding_resampling_follows_dinov2() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=84, patch_size=14, embed_dim=8, depth=1, num_heads=2)  # 6×6 table
    with torch.no_grad():
        model.pos_embed.normal_()
    assert model.interpolate_pos_encoding(36, 84, 84) is model.pos_embed  # native square grid: as stored
    # Same token count, not square: resampled (the early return needs both).
    assert model.interpolate_pos_encoding(36, 56, 126) is not model.pos_embed
    resampled = model.interpolate_pos_encoding(4 * 9, 56, 126).detach()
    # Height first, scale factors (rows + 0.1)/6 and (cols + 0.1)/6.
    grid = model.pos_embed[0, 1:].detach().double().reshape(6, 6, 8)
    rows, cols = _bicubic_matrix(6, 4, (4 + 0.1) / 6), _bicubic_matrix(6, 9, (9 + 0.1) / 6)
    expected = torch.einsum("ri,ijd,cj->rcd", rows, grid, cols).reshape(36, 8)
    torch.testing.assert_close(resampled[0, 1:].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(resampled[:, 0], model.pos_embed[:, 0].detach(), rtol=0, atol=0)
    assert model.forward_features(torch.randn(1, 3, 56, 126))["patch"].shape == (1, 36, 8)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 40, 42))


def test_frozen_positional_embedding_is_resampled_once_per_grid() -> None:
    """A frozen teacher reuses the resampled table (exactly the same values); loading weights,
    in-place edits and a trainable table all recompute."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=84, patch_size=14, embed_dim=8, depth=1, num_heads=2).requires_grad_(False)
    with torch.no_grad():
        model.pos_embed.normal_()
    first = model.interpolate_pos_encoding(4 * 9, 56, 126)
    assert model.interpolate_pos_encoding(4 * 9, 56, 126) is first  # cached
    assert torch.equal(first, model._resample_pos_embed(56, 126))  # the same values as uncached
    other_grid = model.interpolate_pos_encoding(5 * 5, 70, 70)
    assert other_grid.shape[1] == 26 and model.interpolate_pos_encoding(4 * 9, 56, 126) is first

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = state["pos_embed"] * 2
    model.load_state_dict(state)  # copies in place
    torch.testing.assert_close(model.interpolate_pos_encoding(4 * 9, 56, 126), first * 2)
    model.load_state_dict({k: v * 3 if k == "pos_embed" else v for k, v in state.items()}, assign=True)
    torch.testing.assert_close(model.interpolate_pos_encoding(4 * 9, 56, 126), first * 6)
    with torch.no_grad():
        model.pos_embed.zero_()
    assert model.interpolate_pos_encoding(4 * 9, 56, 126).abs().max() == 0

    model.pos_embed.requires_grad_(True)  # a trained table: never cached, gradients flow
    trained = model.interpolate_pos_encoding(4 * 9, 56, 126)
    assert trained.requires_grad and trained is not model.interpolate_pos_encoding(4 * 9, 56, 126)


def test_attention_backends() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
    reference = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    for backend in ("auto", "sdpa", "math"):
        torch.testing.assert_close(attn_mod.attention(q, k, v, backend), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend 'xformers' is unknown; choose one of auto, sdpa, flash_attn, math"):
        VisionTransformer(img_size=28, embed_dim=16, depth=1, num_heads=2, attention="xformers")
    if not attn_mod.flash_attn_installed():
        with pytest.raises(ValueError, match="'flash_attn' was asked for but the flash-attn package is not installed"):
            attn_mod.check_attention_backend("flash_attn")


def test_attention_backend_is_chosen_per_model() -> None:
    """The student's and the teachers' backends are separate settings; building one model never
    changes another's (no process-wide switch)."""
    student = VisionTransformer(img_size=28, embed_dim=16, depth=2, num_heads=2, attention="math")
    teacher = VisionTransformer(img_size=28, embed_dim=16, depth=2, num_heads=2, attention="sdpa")
    assert {block.attn.attention for block in student.blocks} == {"math"}
    assert {block.attn.attention for block in teacher.blocks} == {"sdpa"}
