"""PCA feature maps, as DINOv2 and DUNE show them: the patch features of a set of images are
projected on their first 3 principal components, fitted jointly over all the images (so a colour
means the same thing in every picture), each component min-max scaled to [0, 1] and shown as RGB.

:func:`pca_maps` and :func:`pca_grid` work on tensors and arrays, so training-time logging can use
them as well as ``launch/pca.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

LABEL_HEIGHT = 16  # pixels of the header row naming each column


def pca_maps(patch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) patch features, N = rows·cols → (B, 3, rows, cols) RGB in [0, 1].

    Signs of the components are fixed (largest loading positive), so the same features always give
    the same colours. Fewer than 3 components (tiny D or N) leave the missing channels at 0.
    """
    batch, tokens, dim = patch.shape
    rows, cols = grid
    if rows * cols != tokens:
        raise ValueError(f"{tokens} patch tokens do not fill a {rows}x{cols} grid")
    flat = patch.reshape(-1, dim).double()
    centered = flat - flat.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[:3]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    projected = centered @ (components * signs).T
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    scaled = (projected - low) / (high - low).clamp_min(1e-12)
    rgb = torch.zeros(flat.shape[0], 3, dtype=torch.float64)
    rgb[:, : scaled.shape[1]] = scaled
    return rgb.reshape(batch, rows, cols, 3).permute(0, 3, 1, 2).float()


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, H, W) → uint8, for display next to the maps."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def feature_pictures(encoder: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Training-time pictures (``eval.every_steps``): each ImageNet-normalised probe image beside the
    PCA map of the encoder's patch features (fitted jointly over the probe images), uint8 (B, H, 2W, 3)."""
    patch = encoder.forward_features(images)["patch"].float().cpu()
    grid = (images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size)
    maps = F.interpolate(pca_maps(patch, grid), size=tuple(images.shape[-2:]), mode="nearest")
    side_by_side = torch.cat([denormalize(images), maps.mul(255).round().to(torch.uint8)], dim=-1)
    return side_by_side.permute(0, 2, 3, 1).numpy()


def pca_grid(images: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> np.ndarray:
    """One row per image: the image (uint8 (B, 3, H, W)) then each named map (B, 3, h, w) upscaled
    (nearest) to H×W; a header row names the columns. Returns uint8 (rows, cols, 3)."""
    from PIL import Image, ImageDraw

    height, width = images.shape[-2:]
    columns = [images.cpu()]
    for rgb in maps.values():
        up = F.interpolate(rgb.float().cpu(), size=(height, width), mode="nearest")
        columns.append(up.mul(255).round().clamp(0, 255).to(torch.uint8))
    body = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # (3, B·H, C·W)
    canvas = Image.new("RGB", (body.shape[2], LABEL_HEIGHT + body.shape[1]), "white")
    canvas.paste(Image.fromarray(body.permute(1, 2, 0).numpy()), (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(["image", *maps]):
        draw.text((i * width + 2, 2), name[: max(1, width // 6)], fill="black")
    return np.asarray(canvas)


def save_png(grid: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
