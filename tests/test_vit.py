"""The DINOv2-style ViT as the DUNE student: sizes, token layout, positional-embedding resampling."""

from __future__ import annotations

import pytest
import torch

from dune_scale.models.vit import VisionTransformer, vit_base, vit_small


def _student_params(dim: int, depth: int, grid: int) -> int:
    """12D² + 15D per block, patch embed 3·14²·D + D, cls + (1+grid²) pos + 4 registers, final LN."""
    return depth * (12 * dim * dim + 15 * dim) + 3 * 14 * 14 * dim + dim + dim * (1 + 1 + grid * grid + 4) + 2 * dim


@pytest.mark.parametrize("factory, dim, heads", [(vit_small, 384, 6), (vit_base, 768, 12)])
@pytest.mark.parametrize("size", [336, 448])
def test_student_sizes_and_shapes(factory, dim: int, heads: int, size: int) -> None:
    grid = size // 14
    with torch.device("meta"):
        model = factory(img_size=size)
        out = model.forward_features(torch.empty(2, 3, size, size))
    assert sum(p.numel() for p in model.parameters()) == _student_params(dim, 12, grid)
    assert (model.num_heads, model.num_prefix_tokens, len(model.blocks)) == (heads, 5, 12)
    assert out["cls"].shape == (2, dim) and out["reg"].shape == (2, 4, dim) and out["patch"].shape == (2, grid * grid, dim)
    assert not hasattr(model, "mask_token")  # the student has no unused parameter


def test_known_sizes() -> None:
    with torch.device("meta"):
        assert sum(p.numel() for p in vit_small(img_size=336).parameters()) == 21_753_216
        assert sum(p.numel() for p in vit_base(img_size=448).parameters()) == 86_317_824


def test_layer_scale_init_and_token_layout() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=2, num_heads=4)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-4)
    images = torch.randn(2, 3, 42, 42)
    tokens = model.forward_tokens(images)
    assert tokens.shape == (2, 1 + 4 + 9, 32)
    feats = model.forward_features(images)
    normed = model.norm(tokens)
    torch.testing.assert_close(feats["cls"], normed[:, 0])
    torch.testing.assert_close(feats["reg"], normed[:, 1:5])
    torch.testing.assert_close(feats["patch"], normed[:, 5:])


def test_positional_embedding_is_resampled_for_other_sizes() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=1, num_heads=4)
    assert model.interpolate_pos_encoding(9, 42, 42) is model.pos_embed  # native grid: as stored
    wide = model.interpolate_pos_encoding(12, 42, 56)
    assert wide.shape == (1, 13, 32)
    torch.testing.assert_close(wide[:, 0], model.pos_embed[:, 0])
    assert model.forward_features(torch.randn(1, 3, 70, 56))["patch"].shape == (1, 20, 32)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 40, 42))
