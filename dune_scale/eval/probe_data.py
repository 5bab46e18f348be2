"""The dense probes' data, in the layouts the datasets are released in.

* Semantic segmentation, ADE20K release layout: ``ROOT/images/{training,validation}/NAME.jpg`` and
  ``ROOT/annotations/{training,validation}/NAME.png`` (one class id per pixel, 0 = ignore, classes
  1..N).
* Monocular depth, NYU-Depth-v2 style: ``ROOT/{train,test}/NAME.jpg`` beside ``NAME.png`` (depth as
  uint16 millimetres, 0 = no measurement).

Images go through the validation transform (shorter side to the probe resolution, bicubic, centre
crop); labels follow the same geometry with nearest-neighbour resizing, so a label is the crop's
S×S. A file at fault on its own (undecodable, a label of another size than its image, a depth map
that is not uint16, an image without its label) is skipped and named in the results; what makes
every number wrong (a missing split, a class id above ``num_classes``) stops with one message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from dune_scale.data.errors import DataError
from dune_scale.data.transforms import build_val_transform
from dune_scale.eval.features import Skipped

ADE20K_SPLITS = {"train": "training", "val": "validation"}
NYU_SPLITS = {"train": "train", "val": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Segmentation targets: class c of the file is c - 1 here; the file's 0 ("other") is ignored.
IGNORE = -1


class ProbeDataError(DataError):
    """Probe data that cannot give a right number (named: the folder or file, the value)."""


def ade20k_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of one split, sorted; an image without annotation is paired with
    its would-be path (and skipped when read)."""
    images, labels = Path(root) / "images" / ADE20K_SPLITS[split], Path(root) / "annotations" / ADE20K_SPLITS[split]
    for folder in (images, labels):
        if not folder.is_dir():
            raise ProbeDataError(
                f"{folder}: missing; the ADE20K layout holds images/{{training,validation}}/*.jpg and "
                "annotations/{training,validation}/*.png"
            )
    return _pairs(images, labels)


def nyu_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, depth) paths of one split: ``NAME.jpg`` beside ``NAME.png``."""
    folder = Path(root) / NYU_SPLITS[split]
    if not folder.is_dir():
        raise ProbeDataError(f"{folder}: missing; the NYU layout holds train/ and test/ folders of NAME.jpg + NAME.png (uint16 mm)")
    return _pairs(folder, folder, image_suffixes=(".jpg", ".jpeg"))


def _pairs(images: Path, labels: Path, image_suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[tuple[Path, Path]]:
    pairs = [(path, labels / f"{path.stem}.png") for path in sorted(images.iterdir())
             if path.suffix.lower() in image_suffixes and path.is_file() and not (images == labels and path.suffix == ".png")]
    if not pairs:
        raise ProbeDataError(f"{images}: no images ({', '.join(image_suffixes)})")
    return pairs


class DenseSet(Dataset, ABC):
    """(image, label) pairs → ``(image (3, S, S), target (S, S), index)`` or :class:`Skipped`."""

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int) -> None:
        self.pairs = pairs
        self.image_size = image_size
        self.transform = build_val_transform(image_size)

    def __len__(self) -> int:
        return len(self.pairs)

    @abstractmethod
    def read_target(self, path: Path, image_size: tuple[int, int]) -> np.ndarray | Skipped:
        """The label file as the target array (before the geometry), or why it is skipped."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int] | Skipped:
        image_path, label_path = self.pairs[index]
        try:
            with Image.open(image_path) as img:
                rgb = img.convert("RGB")
        except Exception as err:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
            return Skipped(str(image_path), f"cannot read the image: {err}")
        if not label_path.is_file():
            return Skipped(str(image_path), f"no label file {label_path.name} beside it")
        target = self.read_target(label_path, rgb.size)
        if isinstance(target, Skipped):
            return target
        image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        return self.transform(image), self._geometry(torch.from_numpy(target)), index

    def _geometry(self, target: torch.Tensor) -> torch.Tensor:
        """The image transform's resize and crop, nearest-neighbour (labels are not blended)."""
        out = TF.resize(target[None], [self.image_size], InterpolationMode.NEAREST)
        return TF.center_crop(out, [self.image_size, self.image_size])[0]


def _read_label_file(path: Path) -> tuple[Image.Image, np.ndarray] | Skipped:
    try:
        with Image.open(path) as img:
            img.load()
            return img, np.asarray(img)
    except Exception as err:
        return Skipped(str(path), f"cannot read the label file: {err}")


def _size_problem(path: Path, label: np.ndarray, image_size: tuple[int, int]) -> Skipped | None:
    if label.ndim != 2:
        return Skipped(str(path), f"expected one value per pixel, found shape {label.shape}")
    if (label.shape[1], label.shape[0]) != image_size:
        return Skipped(str(path), f"size {label.shape[1]}x{label.shape[0]} differs from its image's {image_size[0]}x{image_size[1]}")
    return None


class SegmentationSet(DenseSet):
    """ADE20K-layout segmentation: targets are class ids 0..N-1, :data:`IGNORE` where the file says 0."""

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int, num_classes: int) -> None:
        super().__init__(pairs, image_size)
        self.num_classes = num_classes

    def read_target(self, path: Path, image_size: tuple[int, int]) -> np.ndarray | Skipped:
        read = _read_label_file(path)
        if isinstance(read, Skipped):
            return read
        _, label = read
        problem = _size_problem(path, label, image_size)
        if problem is not None:
            return problem
        highest = int(label.max())
        if highest > self.num_classes:
            raise ProbeDataError(
                f"{path}: class id {highest} is above --num-classes {self.num_classes} (ids 1..{self.num_classes}, 0 = ignore); "
                "give the dataset's number of classes"
            )
        return label.astype(np.int16) - 1  # 0 → IGNORE


class DepthSet(DenseSet):
    """NYU-layout depth: targets in metres (float32), 0 where there is no measurement."""

    def read_target(self, path: Path, image_size: tuple[int, int]) -> np.ndarray | Skipped:
        read = _read_label_file(path)
        if isinstance(read, Skipped):
            return read
        img, depth = read
        # PNG has no 32-bit integers: Pillow versions that open 16-bit PNGs as mode "I" read uint16 data.
        if not (img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG")):
            return Skipped(str(path), f"depth must be a uint16 PNG of millimetres, found mode {img.mode}")
        problem = _size_problem(path, depth, image_size)
        if problem is not None:
            return problem
        return depth.astype(np.float32) / 1000.0
