"""Frozen features as every probe sees them, for a student or a teacher alike.

A :class:`FeatureSource` maps ImageNet-normalised images to ``cls`` (B, D) and ``patch`` (B, N, D)
tokens taken where the probe protocols take them:

* ``encoder`` (default): the encoder's last layer *after* its final LayerNorm (DINOv2's linear
  protocol); for a teacher, its own final norm (DINOv2 / Multi-HMR ``norm``, MASt3R ``enc_norm``).
* ``projector:NAME``: the output of the student's projector for teacher NAME (the released DUNE
  table's segmentation numbers are "after DINOv2 projectors"); its token 0 is the class token.

Every source gives the same token grid for an input: a teacher whose patch differs from the grid's
sees the image resized as in training (``align_images``: MASt3R at 16/14 of the size).

:func:`extract` runs a source over a dataset once, batched, and keeps the tokens in a float16
memory-mapped cache on disk (full ADE20K at 448 px is ~30 GB of ViT-B patch tokens), each rank
holding the images of its stride: the probes' heads then train on the cached features.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dune_scale.data.errors import DataError
from dune_scale.distributed import all_reduce_max, all_reduce_sum
from dune_scale.teachers import align_images

# images → {"cls": (B, D), "patch": (B, N, D)}
TokenFeatures = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ENCODER = "encoder"
PROJECTOR_PREFIX = "projector:"


@dataclass(frozen=True)
class FeatureSource:
    """A frozen model as a probe sees it. ``label`` names it in results (``student``, a teacher's
    name); ``patch_size`` is the token grid's (an S×S input gives (S/p)² patch tokens)."""

    label: str
    features: str
    tokens: TokenFeatures
    patch_size: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def check_features(features: str) -> str | None:
    """The projector's teacher of ``projector:NAME``, None for ``encoder``; ValueError otherwise."""
    if features == ENCODER:
        return None
    if features.startswith(PROJECTOR_PREFIX) and features[len(PROJECTOR_PREFIX):]:
        return features[len(PROJECTOR_PREFIX):]
    raise ValueError(f"features {features!r} is unknown; give {ENCODER} or {PROJECTOR_PREFIX}TEACHER")


def encoder_tokens(encoder: nn.Module) -> TokenFeatures:
    """A DINOv2-style ViT's final-normed tokens (its own ``forward_features``)."""
    return lambda images: encoder.forward_features(images)


def projector_tokens(encoder: nn.Module, projector: nn.Module) -> TokenFeatures:
    """What the student's projector predicts: ``[cls, patches]`` of the encoder's last layer (before
    its final norm, as in training) through the projector."""

    def tokens(images: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = encoder.forward_tokens(images)
        projected = projector(torch.cat([hidden[:, :1], hidden[:, encoder.num_prefix_tokens:]], dim=1))
        return {"cls": projected[:, 0], "patch": projected[:, 1:]}

    return tokens


def student_source(
    student: nn.Module, features: str, label: str = "student",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> FeatureSource:
    """``student`` holds ``encoder`` and ``projectors`` (a DUNE student)."""
    teacher = check_features(features)
    if teacher is None:
        return FeatureSource(label, features, encoder_tokens(student.encoder), student.encoder.patch_size, autocast)
    if teacher not in student.projectors:
        known = ", ".join(f"{PROJECTOR_PREFIX}{name}" for name in student.projectors) or "none"
        raise ValueError(f"features {features!r}: this student has no projector for {teacher!r}; its projectors: {known}")
    return FeatureSource(label, features, projector_tokens(student.encoder, student.projectors[teacher]),
                         student.encoder.patch_size, autocast)


def teacher_source(
    teacher: nn.Module, label: str, grid_patch: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> FeatureSource:
    """A teacher's final-normed tokens on the student's token grid (``grid_patch``)."""

    def tokens(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return teacher.forward_features(align_images(images, teacher.patch_size, grid_patch))

    return FeatureSource(label, ENCODER, tokens, grid_patch, autocast)


# ------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Skipped:
    """A sample left out because its own file is at fault (named with the reason)."""

    path: str
    reason: str


def collate_kept(items: list[Any]) -> tuple[list[Any], list[Skipped]]:
    """A batch of ``(image, target, index)`` items and the :class:`Skipped` ones beside them."""
    kept = [item for item in items if not isinstance(item, Skipped)]
    return kept, [item for item in items if isinstance(item, Skipped)]


@dataclass
class Extracted:
    """One split's features as this rank holds them: the images of its stride (global index
    ``rank + k·world`` at row ``k``), tokens ``features`` (rows, T, D) or (rows, D) float16 and
    ``targets`` (rows, …), both memory-mapped; ``valid`` marks the global indices kept on any rank."""

    features: np.ndarray
    targets: np.ndarray
    valid: torch.Tensor
    skipped: list[Skipped]
    grid: tuple[int, int]
    rank: int
    world: int

    @property
    def count(self) -> int:
        return int(self.valid.sum())

    def rows(self, indices: torch.Tensor) -> np.ndarray:
        """This rank's rows of the given global indices (those it holds), in order."""
        mine = indices[indices % self.world == self.rank]
        return (mine // self.world).numpy()

    def shard(self) -> torch.Tensor:
        """The global indices this rank holds and kept."""
        owned = torch.arange(self.rank, len(self.valid), self.world)
        return owned[self.valid[owned]]


@contextlib.contextmanager
def feature_cache(directory: str | None = None) -> Iterator[str]:
    """A private folder for the memory-mapped features, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dune_probe_", dir=directory) as folder:
        yield folder


@torch.no_grad()
def extract(
    source: FeatureSource, dataset: Dataset, token: str, cache: str, name: str, device: torch.device,
    batch_size: int, rank: int = 0, world: int = 1, workers: int = 0, progress: bool = False,
) -> Extracted:
    """Run ``source`` once over this rank's stride of ``dataset`` (items ``(image, target, index)``
    or :class:`Skipped`) and keep ``token`` (``patch`` or ``cls``) features. Every rank runs the same
    number of forwards (a sharded student's forward is collective): a rank short of images runs a
    blank one."""
    indices = list(range(rank, len(dataset), world))
    per_rank = -(-len(dataset) // world)
    batches = -(-per_rank // batch_size)
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_kept)
    valid = torch.zeros(len(dataset), dtype=torch.float64)
    skipped: list[Skipped] = []
    features: np.ndarray | None = None
    targets: np.ndarray | None = None
    grid = (0, 0)
    iterator = iter(loader)
    with _progress(progress, f"{source.label} {name}", batches) as advance:
        for _ in range(batches):
            kept, bad, failure = _next_batch(iterator, world, device)
            if failure is not None:
                raise failure
            skipped += bad
            images = torch.stack([image for image, _, _ in kept]) if kept else _blank(dataset)
            with source.autocast():
                out = source.tokens(images.to(device, non_blocking=True))[token]
            grid = (images.shape[-2] // source.patch_size, images.shape[-1] // source.patch_size)
            if features is None:  # shaped by the first forward, a blank one too: every rank learns D
                features = _store(cache, f"{name}_features_{rank}", np.dtype(np.float16), (len(indices), *out.shape[1:]))
            if kept:
                if targets is None:
                    first = np.asarray(kept[0][1])
                    targets = _store(cache, f"{name}_targets_{rank}", first.dtype, (len(indices), *first.shape))
                rows = [index // world for _, _, index in kept]
                features[rows] = out.float().cpu().numpy().astype(np.float16)
                targets[rows] = np.stack([np.asarray(target) for _, target, _ in kept])
                valid[[index for _, _, index in kept]] = 1.0
            advance()
    if targets is None:  # nothing kept on this rank: its rows are never read
        targets = np.zeros((0,), np.float32)
    valid = all_reduce_sum(valid.to(device)).cpu() > 0
    return Extracted(features, targets, valid, skipped, grid, rank, world)


def _next_batch(iterator: Iterator[Any], world: int, device: torch.device) -> tuple[list[Any], list[Skipped], Exception | None]:
    """The next batch, or the data error that stops the probe, agreed by every rank (a rank that
    stopped alone would leave the others waiting in a collective forward)."""
    failure: Exception | None = None
    try:
        kept, bad = next(iterator, ([], []))
    except DataError as err:
        failure, kept, bad = err, [], []
    if world > 1:
        stop = all_reduce_max(torch.tensor([float(failure is not None)], device=device)).item()
        if stop and failure is None:
            failure = DataError("the probe's data failed on another rank (its message is in that rank's log)")
    return kept, bad, failure


def _blank(dataset: Dataset) -> torch.Tensor:
    """One black image of the dataset's input size, for a forward whose output is not kept."""
    return torch.zeros(1, 3, dataset.image_size, dataset.image_size)


def _store(cache: str, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A memory-mapped array in the cache folder (in memory when empty: nothing to map)."""
    if not shape[0]:
        return np.zeros(shape, dtype)
    return np.lib.format.open_memmap(f"{cache}/{name}.npy", mode="w+", dtype=dtype, shape=shape)


@contextlib.contextmanager
def _progress(show: bool, label: str, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over the extraction batches (``rich``), or nothing."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("[bold]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:  # stdout keeps the result
        task = bar.add_task(f"features {label}", total=total)
        yield lambda: bar.advance(task)
