"""``DataConfig`` + a resolved :class:`Mixture` → a resumable StreamingDataLoader over it (the
trainer's only data entry); the composition root resolves the mixture once and passes it here.

Rank and world size come from the usual environment variables (Streaming reads RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE …). Each pass over the loader is one epoch; iterating again starts the next one.
``state_dict()`` / ``load_state_dict()`` resume mid-epoch at the next global batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

import torch
from streaming import StreamingDataLoader

from dune_scale.config import DataConfig
from dune_scale.data.dataset import MixtureDataset
from dune_scale.data.mixture import Mixture
from dune_scale.data.remote import (
    build_streams,
    check_access,
    release_connections,
    reset_worker_connections,
)
from dune_scale.data.transforms import build_train_transform, build_val_transform
from dune_scale.object_store import s3_endpoint

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def collate_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples → ``{images (B,3,H,W) float32, dataset list[str], index (B,) int64, corrupt int,
    corrupt_shards list[str]}`` (the shards that held the ``corrupt`` undecodable images).

    ``images`` comes first: StreamingDataLoader counts a batch by its first value.
    """
    return {
        "images": torch.stack([s["images"] for s in samples]),
        "dataset": [s["dataset"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "corrupt": sum(s["corrupt"] for s in samples),
        "corrupt_shards": sorted({s["corrupt_shard"] for s in samples if s["corrupt"]}),
    }


def init_loader_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker stops when its training process says so, or dies.

    Stop signals from anyone else are ignored: they are for the training process, which saves and
    then shuts its workers down (SLURM signals every process of a step; a worker killed by that
    SIGTERM would crash the loader before the checkpoint is written). The training process's own
    SIGTERM — how the DataLoader and multiprocessing end a worker that did not stop in time, e.g.
    after an error — ends the worker at once; ignoring that one would hang the job at exit.
    A worker whose training process dies (killed, crashed) is killed by the kernel: no orphans.
    """
    forked_from = multiprocessing.parent_process()  # recorded at fork: right even if the parent died since
    parent = forked_from.pid if forked_from is not None else os.getppid()
    _die_with_parent(parent)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _obey_sigterm_from(parent)
    reset_worker_connections(worker_id)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent exits (elsewhere: torch's watchdog only)."""
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _obey_sigterm_from(parent: int) -> None:
    """SIGTERM from ``parent`` exits this process; from anyone else it is ignored.

    The sender is only known to ``sigwaitinfo``: SIGTERM is blocked in this thread (and so in every
    thread started later) and a daemon thread waits for it. Without ``sigwaitinfo`` (not Linux),
    SIGTERM keeps its default action.
    """
    if not hasattr(signal, "sigwaitinfo"):
        return

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                # Status 0: a stop the parent asked for. Anything else would make torch's SIGCHLD
                # handler, still armed while Python exits, report a worker failure that is none.
                os._exit(0)

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=wait, name="dune-loader-sigterm", daemon=True).start()


def build_train_loader(
    data_cfg: DataConfig, mixture: Mixture, *, image_size: int, batch_size: int, seed: int, epoch_size: int | None = None
) -> StreamingDataLoader:
    """The training loader over ``mixture`` (``data_cfg.mixture`` resolved): ``batch_size`` per rank,
    augmentations of DESIGN §1, ``epoch_size`` samples per epoch over all ranks (None: the mixture's
    datasets once, resampled to their shares)."""
    problem = mixture.batch_size_problem(batch_size)
    if problem:
        raise ValueError(f"batch size {batch_size}: {problem}")
    transform = build_train_transform(image_size, tuple(data_cfg.crop_scale))
    return _build_loader(data_cfg, mixture, None, transform, batch_size, seed, epoch_size, data_cfg.shuffle)


def close_loader(loader: Any) -> None:
    """Free what a loader built here holds until interpreter exit otherwise (Streaming's shared
    memory); it cannot be iterated afterwards. Loaders without such state pass through."""
    release = getattr(getattr(loader, "dataset", None), "release_shared_memory", None)
    if release is not None:
        release()


def build_val_loader(
    data_cfg: DataConfig,
    mixture: Mixture,
    dataset_name: str,
    *,
    image_size: int,
    batch_size: int,
    max_samples: int | None = None,
    num_workers: int | None = None,
) -> StreamingDataLoader:
    """The validation split of ``mixture``'s dataset ``dataset_name`` (``<remote_root>/<name>/val``),
    the same every time it is built.

    Batches have the training batches' fields; images get the validation transform (shorter side
    resized to ``image_size``, centre crop). No shuffling; ``max_samples`` (None: all) takes a fixed
    subset, the same on every call. Each pass over the loader is the whole split, every sample once
    over all ranks: the last batch may be short, and ranks may get one batch more than others, so
    sum per rank and reduce once after the pass (no collective per batch).
    """
    return _build_loader(
        data_cfg, mixture.validation_split(dataset_name), "val", build_val_transform(image_size), batch_size, 0, max_samples, False, num_workers
    )


def _build_loader(
    data_cfg: DataConfig,
    mixture: Mixture,
    split: str | None,
    transform: Any,
    batch_size: int,
    seed: int,
    epoch_size: int | None,
    shuffle: bool,
    num_workers: int | None = None,
) -> StreamingDataLoader:
    endpoint = s3_endpoint(data_cfg.s3_endpoint_url)
    check_access(data_cfg.remote_root, mixture.names, endpoint, data_cfg.download_timeout, split)
    streams = build_streams(mixture, data_cfg.remote_root, endpoint, data_cfg.local_cache, split)
    dataset = MixtureDataset(
        streams=streams,
        mixture=mixture,
        transform=transform,
        keep_partial_batch=split is not None,
        batch_size=batch_size,
        epoch_size=epoch_size,
        # A validation subset (epoch_size < split) must be the same samples at every pass, not a new
        # draw per epoch (Streaming's default): else a resumed run validates on other images.
        sampling_method="fixed" if split is not None else "balanced",
        shuffle=shuffle,
        shuffle_algo=data_cfg.shuffle_algo,
        shuffle_seed=seed,
        shuffle_block_size=data_cfg.shuffle_block_size,
        num_canonical_nodes=data_cfg.num_canonical_nodes,
        predownload=data_cfg.predownload,
        cache_limit=data_cfg.cache_limit,
        download_timeout=data_cfg.download_timeout,
        download_retry=data_cfg.download_retry,
    )
    _warn_size_mismatch(mixture, dataset, split)
    release_connections(dataset.streams)
    workers = data_cfg.num_workers if num_workers is None else num_workers
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


def _warn_size_mismatch(mixture: Mixture, dataset: MixtureDataset, split: str | None) -> None:
    """Shares follow the spec's sizes; say so when the shards hold a different number of images
    (for a validation split: the spec's ``val_size``, e.g. an incomplete conversion)."""
    consequence = f"the {split} split is read as it is" if split else "its batch share follows the spec"
    for spec, actual in zip(mixture.streams, dataset.samples_per_stream):
        if spec.size is not None and abs(int(actual) - spec.size) > 0.01 * spec.size:
            logger.warning(
                "dataset %s holds %d images but the mixture spec says %d; %s",
                spec.name + (f"/{split}" if split else ""),
                int(actual),
                spec.size,
                consequence,
            )
