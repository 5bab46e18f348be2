"""The probes end to end on one feature source: data → features (once) → head or vote → metrics.

What each probe measures is chosen by its options (:mod:`dune_scale.eval.registry`); how it runs
(resolution, device, batches, ranks) by :class:`ProbeSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dune_scale.distributed import all_reduce_sum
from dune_scale.eval.dense import DepthTask, HeadTraining, SegmentationTask, evaluate_head, train_head
from dune_scale.eval.features import FeatureSource, Skipped, extract, feature_cache
from dune_scale.eval.knn import knn_probe
from dune_scale.eval.probe_data import DenseSet, DepthSet, ProbeDataError, SegmentationSet, ade20k_pairs, nyu_pairs


@dataclass(frozen=True)
class ProbeSettings:
    """How a probe runs. ``rank``/``world``: the dense probes spread features and head training over
    ranks (every rank must call); ``cache_dir``: where the feature cache goes (default: the system's
    temporary folder)."""

    image_size: int
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    progress: bool = False
    cache_dir: str | None = None
    rank: int = 0
    world: int = 1


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    train_images: int
    val_images: int
    skipped: list[Skipped] = field(default_factory=list)  # this rank's
    skipped_count: int = 0  # over every rank


def run_knn(options: Any, seed: int, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
    """The weighted k-NN vote on class tokens (no training: ``seed`` is unused). Every rank extracts
    every image, so a sharded student's forwards line up."""
    with source.autocast():
        result = knn_probe(lambda images: source.tokens(images)["cls"], options.train, options.val, settings.image_size,
                           settings.device, k=options.k, temperature=options.temperature, batch_size=settings.batch_size)
    return ProbeResult({"top1": result.top1, "top5": result.top5}, result.train_images, result.val_images,
                       result.skipped, len(result.skipped))


def run_linear_seg(options: Any, seed: int, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
    def dataset(split: str) -> DenseSet:
        return SegmentationSet(ade20k_pairs(options.data, split), settings.image_size, options.num_classes)

    return _dense(SegmentationTask(options.num_classes), dataset, options, seed, source, settings)


def run_depth(options: Any, seed: int, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
    def dataset(split: str) -> DenseSet:
        return DepthSet(nyu_pairs(options.data, split), settings.image_size)

    return _dense(DepthTask(options.max_depth), dataset, options, seed, source, settings)


def _dense(task: Any, dataset: Any, options: Any, seed: int, source: FeatureSource, settings: ProbeSettings) -> ProbeResult:
    training = HeadTraining(options.epochs, options.head_batch_size, options.lr, options.weight_decay, seed)
    sets = {split: dataset(split) for split in ("train", "val")}  # both splits' layout checked before any forward
    with feature_cache(settings.cache_dir) as cache:
        extracted = {
            split: extract(source, data, "patch", cache, split, settings.device, settings.batch_size, settings.rank,
                           settings.world, settings.workers, settings.progress)
            for split, data in sets.items()
        }
        skipped = [item for split in extracted.values() for item in split.skipped]
        skipped_count = int(all_reduce_sum(torch.tensor([float(len(skipped))], device=settings.device)).item())
        for split, found in extracted.items():
            if found.count == 0:
                first = f"; e.g. {skipped[0].path}: {skipped[0].reason}" if skipped else ""
                raise ProbeDataError(f"{Path(options.data)}: no usable {split} images ({skipped_count} skipped{first})")
        head = train_head(task, extracted["train"], training, settings.image_size, settings.device)
        metrics = evaluate_head(task, head, extracted["val"], settings.image_size, settings.device, options.head_batch_size)
        return ProbeResult(metrics, extracted["train"].count, extracted["val"].count, skipped, skipped_count)
