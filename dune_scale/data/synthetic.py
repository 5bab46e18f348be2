"""Small synthetic image datasets written as real MDS shards, for the demo and the tests.

Images have structure a student can learn from (a colour gradient plus random shapes), drawn from a
seeded generator so the same call writes the same bytes.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw
from streaming import MDSWriter

from dune_scale.data.schema import MDS_COLUMNS, MDS_HASHES

# Garbage written in place of an image when a test asks for corrupt samples.
CORRUPT_BYTES = b"\xff\xd8\xff\xe0 this is not a JPEG"

DEMO_DATASETS = (("synth_dino2", "dino2"), ("synth_mast3r", "mast3r"), ("synth_multihmr", "multihmr"))


def synthetic_image(rng: np.random.Generator, size: int, noise: float = 0.0) -> Image.Image:
    """A gradient background with 2–5 random ellipses/rectangles/lines, plus Gaussian pixel noise of
    std ``noise`` (noise makes JPEGs as large and slow to decode as photos)."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    mix = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    background = start + (end - start) * mix[..., None]
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * size
        w, h = rng.uniform(0.1, 0.6, 2) * size
        box = [x0, y0, x0 + w, y0 + h]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=max(1, size // 16))
    if noise:
        pixels = np.asarray(image, np.float32) + rng.normal(0.0, noise, (size, size, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return image


def write_synthetic_dataset(
    out_dir: str | Path,
    name: str,
    num_samples: int,
    image_size: int = 64,
    seed: int = 0,
    shard_size_limit: int = 1 << 20,
    corrupt: Iterable[int] = (),
    noise: float = 0.0,
    split: str | None = None,
) -> Path:
    """Write ``num_samples`` JPEG images as an MDS folder ``out_dir/name`` (``out_dir/name/val`` for
    ``split="val"``, the converter's layout); returns that folder.

    ``corrupt`` lists sample indices whose bytes are replaced by garbage (read-time robustness tests);
    ``noise`` adds pixel noise (photo-like file sizes, for benchmarks). A split draws other images
    than the training set. An existing folder of that name is replaced (the training folder with
    its validation subfolder: write the training split first).
    """
    subfolder = [split] if split and split != "train" else []
    folder = Path(out_dir, name, *subfolder)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), *(zlib.crc32(s.encode()) for s in subfolder)])
    bad = set(corrupt)
    with MDSWriter(
        out=str(folder), columns=MDS_COLUMNS, hashes=MDS_HASHES, size_limit=shard_size_limit, exist_ok=True
    ) as writer:
        for index in range(num_samples):
            buffer = io.BytesIO()
            synthetic_image(rng, image_size, noise).save(buffer, format="JPEG", quality=90)
            data = CORRUPT_BYTES if index in bad else buffer.getvalue()
            writer.write({"image": data, "format": "jpeg", "rotate": 0, "dataset": name, "index": index})
    return folder


def write_demo_shards(
    root: str | Path,
    num_samples_per_dataset: int = 512,
    image_size: int = 64,
    seed: int = 0,
    val_samples_per_dataset: int = 64,
) -> list[dict[str, Any]]:
    """Three synthetic datasets, one per teacher domain, under ``root``, each with a validation split
    of ``val_samples_per_dataset`` images (0: none); returns their mixture list."""
    mixture = []
    for offset, (name, domain) in enumerate(DEMO_DATASETS):
        write_synthetic_dataset(root, name, num_samples_per_dataset, image_size, seed + offset)
        entry = {"name": name, "domain": domain, "size": num_samples_per_dataset}
        if val_samples_per_dataset:
            write_synthetic_dataset(root, name, val_samples_per_dataset, image_size, seed + offset, split="val")
            entry["val_size"] = val_samples_per_dataset
        mixture.append(entry)
    return mixture
