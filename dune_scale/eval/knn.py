"""Weighted k-NN probe on class-token features (the DINO protocol: k = 20, T = 0.07, top-1 / top-5).

Features are the encoder's final-normed class tokens, L2-normalised. Each validation image votes with
its k most similar training images (cosine similarity), each vote weighted by exp(similarity / T);
the classes ranked by their summed weight give top-1 and top-5 accuracy. No training, so the number
reflects the frozen features alone and is cheap enough to watch during training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dune_scale.data.transforms import CorruptImageError, build_val_transform, decode_image, decode_stored_image
from dune_scale.eval.features import Skipped, collate_kept
from dune_scale.eval.probe_data import ProbeDataError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@dataclass(frozen=True)
class KnnResult:
    top1: float
    top5: float
    k: int
    temperature: float
    train_images: int
    val_images: int
    skipped: list[Skipped] = field(default_factory=list)


class LabelledImages(Dataset):
    """An ImageFolder tree (one sub-folder of images per class) with the validation transform; a file
    PIL cannot read becomes :class:`Skipped`."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(str(root), loader=str)  # lists the files; they are decoded in __getitem__
        self.samples = folder.samples
        self.classes = list(folder.classes)
        self.transform = build_val_transform(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | Skipped:
        path, label = self.samples[index]
        try:
            image = decode_image(Path(path).read_bytes())
        except (CorruptImageError, OSError) as err:
            return Skipped(path, str(err))
        return self.transform(image), label, index


class LabelledShards(Dataset):
    """A local MDS folder whose samples hold an image (``image``, or the ``jpeg`` of older shards) and
    an integer ``label`` (``convert_data.py --labels folders``); every sample is read on every rank
    (unlike a StreamingDataset, which splits them over ranks)."""

    def __init__(self, root: str | Path, image_size: int) -> None:
        from streaming.base.local import LocalDataset

        self.root = Path(root)
        self.samples = LocalDataset(str(root))
        if len(self.samples) and "label" not in self.samples[0]:
            raise ProbeDataError(
                f"{root}: its samples hold no 'label' column; convert the class folders with "
                "launch/convert_data.py --labels folders"
            )
        self.labels = [int(self.samples[i]["label"]) for i in range(len(self.samples))]
        self.classes = [str(label) for label in range(max(self.labels, default=-1) + 1)]
        self.transform = build_val_transform(image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | Skipped:
        try:
            image = decode_stored_image(self.samples[index])
        except CorruptImageError as err:
            return Skipped(f"{self.root} sample {index}", str(err))
        return self.transform(image), self.labels[index], index


def labelled_set(root: str | Path, image_size: int) -> LabelledImages | LabelledShards:
    """MDS shards (a folder with ``index.json``) or an ImageFolder tree."""
    if (Path(root) / "index.json").is_file():
        return LabelledShards(root, image_size)
    return LabelledImages(root, image_size)


@torch.no_grad()
def extract_features(
    features: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[list[Any], list[Skipped]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[Skipped]]:
    """(L2-normalised fp32 features [N, D], labels [N], skipped files) of every batch, on ``device``."""
    feats, labels, skipped = [], [], []
    for kept, bad in batches:
        skipped += bad
        if kept:
            images = torch.stack([image for image, _, _ in kept])
            feats.append(F.normalize(features(images.to(device)).float(), dim=-1))
            labels.append(torch.tensor([label for _, label, _ in kept], device=device))
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device), skipped
    return torch.cat(feats), torch.cat(labels), skipped


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk: int = 256,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (fractions) of the weighted k-NN vote; features already normalised."""
    k = min(k, train_features.shape[0])
    top_n = min(5, num_classes)
    correct1 = correct5 = 0
    for start in range(0, val_features.shape[0], chunk):
        queries, truth = val_features[start : start + chunk], val_labels[start : start + chunk]
        similarity, neighbours = (queries @ train_features.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        ranked = votes.argsort(dim=1, descending=True)[:, :top_n]
        hits = ranked == truth[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    total = val_features.shape[0]
    return correct1 / total, correct5 / total


def knn_probe(
    features: Callable[[torch.Tensor], torch.Tensor],
    train_dir: str | Path,
    val_dir: str | Path,
    image_size: int,
    device: torch.device,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 64,
) -> KnnResult:
    """The probe end to end on two labelled sets (ImageFolder trees or MDS shards with labels);
    ``features`` maps images to class tokens."""
    train, val = labelled_set(train_dir, image_size), labelled_set(val_dir, image_size)
    if isinstance(train, LabelledImages) and isinstance(val, LabelledImages) and train.classes != val.classes:
        raise ProbeDataError(f"{val_dir} has classes {val.classes}, {train_dir} has {train.classes}")
    train_feats, train_labels, skipped = extract_features(
        features, DataLoader(train, batch_size=batch_size, collate_fn=collate_kept), device)
    val_feats, val_labels, val_skipped = extract_features(
        features, DataLoader(val, batch_size=batch_size, collate_fn=collate_kept), device)
    skipped += val_skipped
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise ProbeDataError(
            f"k-NN needs images in both {train_dir} ({len(train_labels)} readable) and {val_dir} ({len(val_labels)} readable)"
            + (f"; skipped: {skipped[0].path} ({skipped[0].reason})" if skipped else "")
        )
    num_classes = max(len(train.classes), len(val.classes))
    top1, top5 = weighted_knn(train_feats, train_labels, val_feats, val_labels, num_classes, k, temperature)
    return KnnResult(top1=top1, top5=top5, k=k, temperature=temperature, train_images=len(train_labels),
                     val_images=len(val_labels), skipped=skipped)
