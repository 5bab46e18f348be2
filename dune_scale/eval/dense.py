"""Linear probes on frozen patch tokens: semantic segmentation and monocular depth.

The head is DINOv2's linear one: BatchNorm + a 1×1 linear map on the last layer's patch-token grid,
its output upsampled bilinearly (``align_corners=False``) to the label size. It trains on features
extracted once (:mod:`dune_scale.eval.features`) with AdamW and a linearly decaying learning rate.

Two choices make the number independent of how it was computed, and deterministic for a seed:

* The BatchNorm normalises with the statistics of *all* training features (computed once, exactly,
  over every rank), not of each minibatch: at inference DINOv2's BatchNorm is such a fixed affine
  map too, and this way a probe spread over ranks trains the same head as one process.
* Spread over ranks, every rank holds the features of its stride of the images, the minibatches are
  drawn from one seeded order of all images, and each step sums the ranks' gradients: the head is
  the one a single process trains. The bilinear upsampling is two small matrix products (whose
  backward is deterministic on GPUs, unlike ``F.interpolate``'s).

Depth follows DINOv2's linear depth head: 256 bins spread uniformly over (1 mm, ``max_depth``), the
head's ReLU'd scores (+0.1) normalised into weights whose mean bin is the depth, trained with the
scale-invariant log loss (SigLoss: √(Var g + 0.15·(mean g)²), g = log pred − log target) per image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dune_scale.distributed import all_reduce_sum
from dune_scale.eval.features import Extracted
from dune_scale.eval.probe_data import IGNORE

MIN_DEPTH = 1e-3  # metres: below this a depth pixel is "no measurement"
DEPTH_BINS = 256
BIN_SCORE_FLOOR = 0.1  # DINOv2's "linear" normalisation of the bin scores
SIGLOSS_MEAN_WEIGHT = 0.15
DELTA = 1.25


@dataclass(frozen=True)
class HeadTraining:
    """How the head is trained on the cached features."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int


class LinearHead(nn.Module):
    """BatchNorm (fixed statistics: those of the training features) + 1×1 linear map."""

    def __init__(self, dim: int, out: int, mean: torch.Tensor, var: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.norm.running_mean.copy_(mean)
        self.norm.running_var.copy_(var)
        self.linear = nn.Conv2d(dim, out, kernel_size=1)
        nn.init.normal_(self.linear.weight, std=0.01, generator=generator)  # mmseg's init of the classifier
        nn.init.zeros_(self.linear.bias)

    def train(self, mode: bool = True) -> LinearHead:
        super().train(mode)
        self.norm.eval()  # its statistics stay the training set's
        return self

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(grid))


def upsampling_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in): 1-D linear interpolation as ``F.interpolate(align_corners=False)`` does it;
    two of them make its bilinear upsampling."""
    identity = torch.eye(size_in, dtype=torch.float64)[:, None, :]
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[:, 0, :].T.float()


class Upsample:
    def __init__(self, grid: tuple[int, int], size: int, device: torch.device) -> None:
        self.rows = upsampling_matrix(grid[0], size).to(device)
        self.cols = upsampling_matrix(grid[1], size).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,Hh,Ww->bcHW", x, self.rows, self.cols)


class SegmentationTask:
    """Per-pixel classification; mIoU and pixel accuracy from one confusion matrix (torchmetrics'
    ``MulticlassJaccardIndex``: classes absent from both prediction and labels do not count, as in
    mmseg), summed over ranks before it is read."""

    metric_keys = ("miou", "pixel_accuracy")

    def __init__(self, num_classes: int) -> None:
        self.channels = num_classes

    def output(self, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def target(self, stored: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(stored)).to(device).long()

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(summed cross-entropy over labelled pixels, their number). Written out (log-softmax +
        gather) because CUDA's NLL reduction accumulates with atomics, in no fixed order."""
        valid = target != IGNORE
        logp = out.float().log_softmax(dim=1)
        picked = logp.gather(1, target.clamp_min(0)[:, None])[:, 0]
        return -(picked * valid).sum(), float(valid.sum())

    def metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.channels)


class SegmentationMetrics:
    def __init__(self, num_classes: int) -> None:
        from torchmetrics.classification import MulticlassJaccardIndex

        self.iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, average="macro", sync_on_compute=False)

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        self.iou = self.iou.to(out.device)
        self.iou.update(out.argmax(dim=1), target)

    def compute(self, device: torch.device) -> dict[str, float]:
        self.iou = self.iou.to(device)
        all_reduce_sum(self.iou.confmat)
        confusion = self.iou.confmat
        with warnings.catch_warnings():  # a rank without images never called update: its sum is in confmat
            warnings.simplefilter("ignore")
            miou = float(self.iou.compute())
        return {"miou": miou, "pixel_accuracy": float(confusion.diagonal().sum() / confusion.sum().clamp_min(1))}


class DepthTask:
    """Depth from bin weights; per-image SigLoss. Metrics are averaged over images, each over its
    measured pixels (≤ ``max_depth``), as the depth toolboxes DINOv2 reports with do; written here
    because torchmetrics pools pixels over the whole set and has no δ threshold accuracy."""

    metric_keys = ("rmse", "abs_rel", "delta1")

    def __init__(self, max_depth: float, bins: int = DEPTH_BINS) -> None:
        self.channels = bins
        self.max_depth = max_depth
        self.centres = torch.linspace(MIN_DEPTH, max_depth, bins)

    def output(self, scores: torch.Tensor) -> torch.Tensor:
        weights = scores.float().relu() + BIN_SCORE_FLOOR
        weights = weights / weights.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", weights, self.centres.to(scores.device))[:, None]

    def target(self, stored: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(stored)).to(device).float()

    def measured(self, target: torch.Tensor) -> torch.Tensor:
        return (target > MIN_DEPTH) & (target <= self.max_depth)

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(sum of per-image SigLoss, number of images with a measured pixel)."""
        mask = self.measured(target)
        count = mask.sum(dim=(1, 2)).clamp_min(1)
        g = (torch.log(out[:, 0] + MIN_DEPTH) - torch.log(target + MIN_DEPTH)) * mask
        mean = g.sum(dim=(1, 2)) / count
        var = (g.square().sum(dim=(1, 2)) / count - mean.square()).clamp_min(0)
        has = mask.flatten(1).any(dim=1)
        per_image = torch.sqrt(var + SIGLOSS_MEAN_WEIGHT * mean.square() + 1e-12)
        return (per_image * has).sum(), float(has.sum())

    def metrics(self) -> DepthMetrics:
        return DepthMetrics(self)


class DepthMetrics:
    def __init__(self, task: DepthTask) -> None:
        self.task = task
        self.sums = torch.zeros(4, dtype=torch.float64)  # rmse, abs_rel, delta1, images

    def update(self, out: torch.Tensor, target: torch.Tensor) -> None:
        pred = out[:, 0].float().clamp(MIN_DEPTH, self.task.max_depth)
        for p, t, m in zip(pred, target, self.task.measured(target)):
            if not m.any():
                continue
            p, t = p[m].double(), t[m].double()
            ratio = torch.maximum(p / t, t / p)
            row = torch.stack([(p - t).square().mean().sqrt(), ((p - t).abs() / t).mean(), (ratio < DELTA).double().mean(),
                               torch.ones((), dtype=torch.float64, device=p.device)])
            self.sums += row.cpu()

    def compute(self, device: torch.device) -> dict[str, float]:
        rmse, abs_rel, delta1, images = all_reduce_sum(self.sums.to(device)).tolist()
        images = max(images, 1.0)
        return {"rmse": rmse / images, "abs_rel": abs_rel / images, "delta1": delta1 / images}


DenseTask = SegmentationTask | DepthTask


def _grid(features: np.ndarray, rows: np.ndarray, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Cached (N, D) token rows → (B, D, h, w) float32 on ``device``."""
    tokens = torch.from_numpy(np.ascontiguousarray(features[rows])).to(device).float()
    return tokens.transpose(1, 2).reshape(len(rows), -1, *grid)


def feature_statistics(train: Extracted, device: torch.device, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of every kept training token, over all ranks (float64 sums)."""
    dim = train.features.shape[-1]
    sums = torch.zeros(2 * dim + 1, dtype=torch.float64)
    rows = (train.shard() // train.world).numpy()
    for start in range(0, len(rows), chunk):
        block = torch.from_numpy(np.ascontiguousarray(train.features[rows[start:start + chunk]])).double().reshape(-1, dim)
        sums += torch.cat([block.sum(0), block.square().sum(0), torch.tensor([float(block.shape[0])], dtype=torch.float64)])
    sums = all_reduce_sum(sums.to(device)).cpu()
    count = sums[-1].clamp_min(1)
    mean = sums[:dim] / count
    return mean.float(), (sums[dim:2 * dim] / count - mean.square()).clamp_min(0).float()


def _minibatches(train: Extracted, training: HeadTraining) -> Iterator[torch.Tensor]:
    """Global indices of every step: one seeded order of all kept images per epoch."""
    kept = torch.nonzero(train.valid)[:, 0]
    generator = torch.Generator().manual_seed(training.seed)
    for _ in range(training.epochs):
        order = kept[torch.randperm(len(kept), generator=generator)]
        yield from order.split(training.batch_size)


def train_head(task: DenseTask, train: Extracted, training: HeadTraining, label_size: int, device: torch.device) -> LinearHead:
    """The head trained on ``train``'s cached tokens; every rank ends with the same head."""
    mean, var = feature_statistics(train, device)
    generator = torch.Generator().manual_seed(training.seed)
    head = LinearHead(len(mean), task.channels, mean, var, generator).to(device).train()
    params = list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    total = training.epochs * math.ceil(train.count / training.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    upsample = Upsample(train.grid, label_size, device)
    for batch in _minibatches(train, training):
        for p in params:  # a rank without images in this minibatch still adds its (zero) share
            p.grad = torch.zeros_like(p)
        rows = train.rows(batch)
        count = 0.0
        if len(rows):
            out = upsample(task.output(head(_grid(train.features, rows, train.grid, device))))
            loss, count = task.loss(out, task.target(train.targets[rows], device))
            loss.backward()
        summed = all_reduce_sum(torch.cat([*(p.grad.flatten() for p in params), torch.tensor([count], device=device)]))
        if summed[-1] > 0:
            offset = 0
            for p in params:
                p.grad.copy_(summed[offset:offset + p.numel()].view_as(p) / summed[-1])
                offset += p.numel()
            optimizer.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def evaluate_head(
    task: DenseTask, head: LinearHead, val: Extracted, label_size: int, device: torch.device, batch_size: int
) -> dict[str, float]:
    """The task's metrics over every rank's share of ``val``."""
    metrics = task.metrics()
    upsample = Upsample(val.grid, label_size, device)
    rows = (val.shard() // val.world).numpy()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = upsample(task.output(head(_grid(val.features, chunk, val.grid, device))))
        metrics.update(out, task.target(val.targets[chunk], device))
    return metrics.compute(device)
