"""Image decoding and the DUNE augmentations (DESIGN §1), driven by an explicit random generator.

The train transform draws every random number from a ``torch.Generator`` passed per call instead of
the global RNG: the loader seeds that generator from (seed, epoch, sample position in the epoch), so
an image gets the same augmentation whatever the worker count, process or resume point.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from dune_scale.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD


class CorruptImageError(ValueError):
    """Bytes that PIL cannot decode (corrupt, truncated or not an image)."""


def decode_image(data: bytes, rotate: int = 0) -> torch.Tensor:
    """Image bytes (JPEG, PNG or anything PIL reads) → uint8 RGB tensor (3, H, W).

    ``rotate``: degrees counter-clockwise, applied as the official DUNE loader does for BEDLAM
    "closeup" images (PIL ``Image.rotate``: same canvas size, corners filled black).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {err}") from None
    if rotate:
        rgb = rgb.rotate(rotate)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def decode_stored_image(sample: dict[str, Any]) -> torch.Tensor:
    """An MDS sample's image: the ``image`` column (any format, see ``schema.MDS_COLUMNS``) with its
    ``rotate`` angle, or the ``jpeg`` column of shards written before formats were kept."""
    data = sample["image"] if "image" in sample else sample["jpeg"]
    return decode_image(data, int(sample.get("rotate", 0)))


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, position): independent streams, stable everywhere."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def _normalize(image: torch.Tensor) -> torch.Tensor:
    return F.normalize(image.float().div_(255.0), list(IMAGENET_MEAN), list(IMAGENET_STD))


class TrainTransform:
    """RandomResizedCrop (bicubic, antialias) → h-flip .5 → colour jitter (.4, .4, .2, .1) p .8 →
    grayscale p .2 → Gaussian blur k9 σ∈[.1, 5] p .2 → solarize p .2 → ImageNet normalisation."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.4, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
    ) -> None:
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.log_ratio = (math.log(crop_ratio[0]), math.log(crop_ratio[1]))
        self.jitter = jitter

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (3, H, W) → float32 (3, size, size), all randomness from ``generator``."""
        g = generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        top, left, height, width = self._crop_box(image.shape[-2], image.shape[-1], g)
        size = [self.image_size, self.image_size]
        out = F.resized_crop(image, top, left, height, width, size, InterpolationMode.BICUBIC, antialias=True)
        if _chance(g, 0.5):
            out = F.horizontal_flip(out)
        if _chance(g, 0.8):
            out = self._color_jitter(out, g)
        if _chance(g, 0.2):
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        if _chance(g, 0.2):
            sigma = _uniform(g, 0.1, 5.0)
            out = F.gaussian_blur(out, [9, 9], [sigma, sigma])
        if _chance(g, 0.2):
            out = F.solarize(out, 128)
        return _normalize(out)

    def _crop_box(self, height: int, width: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """Area fraction in ``crop_scale``, log-uniform aspect ratio; ten tries, then a centre crop."""
        area = height * width
        for _ in range(10):
            target = area * _uniform(g, *self.crop_scale)
            ratio = math.exp(_uniform(g, *self.log_ratio))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        lo, hi = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        aspect = width / height
        if aspect < lo:
            w, h = width, round(width / lo)
        elif aspect > hi:
            h, w = height, round(height * hi)
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _color_jitter(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        brightness, contrast, saturation, hue = self.jitter
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                image = F.adjust_brightness(image, _uniform(g, max(0.0, 1 - brightness), 1 + brightness))
            elif op == 1:
                image = F.adjust_contrast(image, _uniform(g, max(0.0, 1 - contrast), 1 + contrast))
            elif op == 2:
                image = F.adjust_saturation(image, _uniform(g, max(0.0, 1 - saturation), 1 + saturation))
            else:
                image = F.adjust_hue(image, _uniform(g, -hue, hue))
        return image


class ValTransform:
    """Resize the shorter side to the crop size (bicubic, antialias), centre crop, normalise.

    As the official DUNE validation (its test transform resizes to ``image_size`` itself, not to the
    ImageNet-classification 256/224 of it), so held-out losses compare with the paper's.
    """

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (3, H, W) → float32 (3, size, size); ``generator`` is accepted and unused."""
        out = F.resize(image, [self.image_size], InterpolationMode.BICUBIC, antialias=True)
        out = F.center_crop(out, [self.image_size, self.image_size])
        return _normalize(out)


def build_train_transform(image_size: int, crop_scale: tuple[float, float] = (0.4, 1.0)) -> TrainTransform:
    return TrainTransform(image_size, crop_scale=tuple(crop_scale))


def build_val_transform(image_size: int) -> ValTransform:
    return ValTransform(image_size)
