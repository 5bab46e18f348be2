"""``DataConfig`` → a resumable StreamingDataLoader over the mixture (the trainer's only data entry).

Rank and world size come from the usual environment variables (Streaming reads RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE …). Each pass over the loader is one epoch; iterating again starts the next one.
``state_dict()`` / ``load_state_dict()`` resume mid-epoch at the next global batch.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from streaming import StreamingDataLoader

from dune_scale.data.dataset import MixtureDataset
from dune_scale.data.mixture import Mixture, resolve_mixture
from dune_scale.data.remote import (
    build_streams,
    check_access,
    configure_s3_endpoint,
    release_connections,
    reset_worker_connections,
)
from dune_scale.data.transforms import build_train_transform

logger = logging.getLogger(__name__)


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples → ``{images (B,3,H,W) float32, dataset list[str], index (B,) int64, corrupt int}``.

    ``images`` comes first: StreamingDataLoader counts a batch by its first value.
    """
    return {
        "images": torch.stack([s["images"] for s in samples]),
        "dataset": [s["dataset"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "corrupt": sum(s["corrupt"] for s in samples),
    }


def init_loader_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``. Stop signals are for the training process, which saves and then
    shuts its workers down: a worker killed by the scheduler's SIGTERM (SLURM signals every process
    of a step) would instead crash the loader before the checkpoint is written."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    reset_worker_connections(worker_id)


def build_train_loader(
    data_cfg: Any, *, image_size: int, batch_size: int, seed: int, epoch_size: int | None = None
) -> StreamingDataLoader:
    """The training loader: ``batch_size`` per rank, augmentations of DESIGN §1, ``epoch_size``
    samples per epoch over all ranks (None: the mixture's datasets once, resampled to their shares)."""
    mixture = resolve_mixture(data_cfg.mixture, data_cfg.balance, data_cfg.remote_root)
    problem = mixture.batch_size_problem(batch_size)
    if problem:
        raise ValueError(f"batch size {batch_size}: {problem}")
    configure_s3_endpoint(data_cfg.s3_endpoint_url)
    check_access(data_cfg.remote_root, mixture.names)
    streams = build_streams(mixture, data_cfg.remote_root, data_cfg.local_cache)
    dataset = MixtureDataset(
        streams=streams,
        mixture=mixture,
        transform=build_train_transform(image_size, tuple(data_cfg.crop_scale)),
        batch_size=batch_size,
        epoch_size=epoch_size,
        shuffle=data_cfg.shuffle,
        shuffle_algo=data_cfg.shuffle_algo,
        shuffle_seed=seed,
        shuffle_block_size=data_cfg.shuffle_block_size,
        num_canonical_nodes=data_cfg.num_canonical_nodes,
        predownload=data_cfg.predownload,
        cache_limit=data_cfg.cache_limit,
        download_timeout=data_cfg.download_timeout,
        download_retry=data_cfg.download_retry,
    )
    _warn_size_mismatch(mixture, dataset)
    release_connections(dataset.streams)
    workers = data_cfg.num_workers
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=data_cfg.prefetch_factor if workers else None,
        pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
        collate_fn=collate_batch,
        worker_init_fn=init_loader_worker,
        drop_last=False,
    )


def _warn_size_mismatch(mixture: Mixture, dataset: MixtureDataset) -> None:
    """Shares follow the spec's sizes; say so when the shards hold a different number of images."""
    for spec, actual in zip(mixture.streams, dataset.samples_per_stream):
        if spec.size is not None and abs(int(actual) - spec.size) > 0.01 * spec.size:
            logger.warning(
                "dataset %s holds %d images but the mixture spec says %d; its batch share follows the spec",
                spec.name,
                int(actual),
                spec.size,
            )
