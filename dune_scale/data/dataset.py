"""The training dataset: a StreamingDataset over one stream per mixture dataset, yielding augmented images.

On top of Streaming it adds grouped batching (``batching.py``), per-sample augmentation seeds from
(seed, epoch, position in the epoch), and deterministic replacement of images that fail to decode.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.shared.memory import SharedMemory

from dune_scale.data.batching import GROUPED, register_grouped_batching, samples_per_epoch, worker_positions
from dune_scale.data.errors import DataError
from dune_scale.data.mixture import Mixture
from dune_scale.data.remote import SHARD_HASH, StorageAccessError, file_hash
from dune_scale.data.transforms import CorruptImageError, decode_stored_image, sample_generator

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class MixtureDataset(StreamingDataset):
    """Streams of a :class:`Mixture` → samples ``{images, dataset, index, corrupt}``.

    ``dataset`` is the mixture's name of the sample's stream, ``index`` the sample's index within
    its dataset (the MDS ``index`` column), ``corrupt`` 1 when the stored image could not be decoded
    and was replaced by the next decodable image of the same shard (the same one on every run), and
    ``corrupt_shard`` then names that shard (``dataset/shard file``; "" otherwise).

    A local shard is checked against the hash its index.json records once per process, before its
    first sample is read (downloaded shards are checked as they arrive): a shard damaged in place
    stops the run, named, instead of training on garbled samples.
    """

    def __init__(
        self,
        *,
        streams: Sequence[Stream],
        mixture: Mixture,
        transform: Transform,
        keep_partial_batch: bool = False,
        **kwargs: Any,
    ) -> None:
        """``keep_partial_batch``: end each epoch with the samples that do not fill a whole global
        batch (one-dataset mixtures only: validation reads every sample); training drops them."""
        if keep_partial_batch and len(mixture.group_names) != 1:
            raise ValueError("keep_partial_batch needs a mixture with a single group")
        self.keep_partial_batch = keep_partial_batch
        super().__init__(streams=streams, batching_method="random", **kwargs)
        # Streaming validates the method name against its own list; ours is registered in _get_work.
        self.batching_method = GROUPED
        self.mixture = mixture
        self.group_streams = mixture.group_streams()
        self.group_shares = list(mixture.group_shares)
        self.group_names = list(mixture.group_names)
        self.transform = transform
        self._epoch = 0
        self._positions = np.zeros(0, np.int64)
        self._position: int | None = None
        self._background_error: BaseException | None = None
        self._epoch_iterator: Any = None  # Streaming's per-epoch read state, in the process that reads
        self._verified: set[int] = set()  # local shards whose hash this process has checked

    def release_shared_memory(self) -> None:
        """Close (and, where this process created them, unlink) the dataset's shared-memory segments,
        and remove its lock files.

        Streaming keeps every segment alive until the interpreter exits, and each new dataset in the
        same process opens all earlier ones while choosing its prefix: a process that builds loaders
        again and again (benchmark variants, validation sets, tests) would run out of file
        descriptors. Its lock files (``NNNNNN_barrier_filelock``, ``NNNNNN_cache_filelock`` in the
        system temp folder) are never removed: one set per run would pile up. Call it once the
        loader is done with; the dataset cannot be iterated after.
        """
        for segment in _shared_memory_of(self):
            segment.cleanup()  # idempotent: a second call finds nothing left to unlink
            atexit.unregister(segment.cleanup)
        for lock in (self._shared_barrier.filelock_path, self._cache_filelock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resume state, with a finished epoch saved as the start of the next one.

        Otherwise a run resumed from a checkpoint taken right after an epoch's last batch would
        first see an empty pass over the loader.
        """
        state = super().state_dict(num_samples, from_beginning)
        global_batch = self.batch_size * self._parallel_rank_world.num_ranks
        if state["sample_in_epoch"] >= samples_per_epoch(self, global_batch):
            state.update(epoch=state["epoch"] + 1, sample_in_epoch=0)
        return state

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        """Keep this worker's epoch and sample positions alongside Streaming's work split."""
        register_grouped_batching()
        work = super()._get_work(epoch, sample_in_epoch)
        self._epoch = epoch
        self._positions = worker_positions(self._parallel_worker_world, self.batch_size, sample_in_epoch, len(work))
        return work

    def _each_sample_id(self, it: Any) -> Iterator[int]:
        """Expose the position of the sample being yielded to :meth:`get_item`.

        Streaming ends the epoch quietly when a download thread fails; raise that failure instead.
        """
        self._epoch_iterator = it
        for sample_id in super()._each_sample_id(it):
            self._position = int(self._positions[it.yield_index])
            yield sample_id
            self._position = None
        if self._background_error is not None:
            raise self._background_error

    def _evict_coldest_shard(self) -> None:
        """Evict the least recently touched local shard that this worker's samples ahead do not need.

        Streaming evicts the least recently touched shard, and under ``data.cache_limit`` that can be
        one its read-ahead downloaded but nobody has read yet (a download touches it once; reads
        touch the others later). Its ready thread re-downloads an evicted shard only before it starts
        waiting for it, so the epoch then waits forever. The shards of the samples from this worker's
        read position to its read-ahead are kept; with nothing else to evict, Streaming's rule applies.
        """
        it = self._epoch_iterator
        if it is None:
            return super()._evict_coldest_shard()
        ahead = it.sample_ids[it.yield_index : it.prepare_index]
        needed = {self.spanner[int(sample_id)][0] for sample_id in ahead if sample_id != -1}
        local = np.flatnonzero(self._shard_states.numpy() == _ShardState.LOCAL)
        spare = [int(shard_id) for shard_id in local if shard_id not in needed]
        if not spare:
            return super()._evict_coldest_shard()
        touched = self._shard_access_times.numpy()
        self._evict_shard(min(spare, key=lambda shard_id: touched[shard_id]))

    def on_exception(self, future: Future) -> None:
        """Keep a download thread's error for the sample reader to raise (Streaming only says
        "Background thread failed") and stop the other threads, as Streaming does; raising it here
        too would only print its traceback a second time, from the thread pool."""
        error = future.exception()
        if error is None:
            return
        if self._background_error is None:
            self._background_error = error
        self._event.set()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's shard preparation (download or local check), its failures naming the shard.

        Streaming marks a shard "being prepared" while it works on it and leaves that mark when the
        work fails (a shard deleted under the reader, a download that gives up): every other worker
        needing the shard would then wait for it forever, and the loader's first error would never
        be delivered. The state it had is restored, so they meet the failure too."""
        before = self._shard_states[shard_id]
        try:
            super().prepare_shard(shard_id, blocking)
        except BaseException as err:
            if before != _ShardState.PREPARING and self._shard_states[shard_id] == _ShardState.PREPARING:
                self._shard_states[shard_id] = before
            if isinstance(err, (DataError, StorageAccessError)) or not isinstance(err, Exception):
                raise
            raise self._shard_error(shard_id, err) from None

    def _shard_error(self, shard_id: int, err: BaseException) -> DataError:
        """``err`` met while reading shard ``shard_id`` → an error naming dataset, shard file and cause."""
        stream_id = int(self.stream_per_shard[shard_id])
        stream = self.streams[stream_id]
        basename = self.shards[shard_id].file_pairs[0][0].basename
        where = os.path.join(stream.remote or stream.local, stream.split or "", basename)
        message = str(err)
        if isinstance(err, IndexError) or "not present in the shard" in message:
            cause = "the shard file is shorter than its index.json says (truncated or damaged)"
        elif isinstance(err, FileNotFoundError) or "In the absence of local dataset" in message:
            cause = "the shard file is missing (deleted or moved since the run started)"
        else:
            cause = f"{type(err).__name__}: {message}"
        return DataError(
            f"dataset {self.mixture.streams[stream_id].name}, shard {where}: {cause}; "
            "re-convert the dataset or restore the file"
        )

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        shard_id, _ = self.spanner[sample_id]
        name = self.mixture.streams[self.stream_per_shard[shard_id]].name
        if shard_id not in self._verified:
            self._verify_local_shard(shard_id, name)
        raw, image, replaced = self._decoded(sample_id, name, retry)
        epoch, position = (self._epoch, self._position) if self._position is not None else (0, sample_id)
        images = self.transform(image, sample_generator(self.shuffle_seed, epoch, position))
        shard = f"{name}/{self.shards[shard_id].file_pairs[0][0].basename}" if replaced else ""
        return {"images": images, "dataset": name, "index": int(raw["index"]), "corrupt": int(replaced), "corrupt_shard": shard}

    def _verify_local_shard(self, shard_id: int, name: str) -> None:
        """A local shard's files against the hash index.json records for them (where it records one)."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        if stream.remote is None:
            for raw, _ in self.shards[shard_id].file_pairs:
                path = os.path.join(stream.local, stream.split or "", raw.basename)
                expected = raw.hashes.get(SHARD_HASH)
                # A missing or shorter file is named by the read that fails on it.
                if expected and os.path.isfile(path) and os.path.getsize(path) >= raw.bytes and file_hash(path) != expected:
                    raise DataError(
                        f"dataset {name}, shard {path}: its content does not match the {SHARD_HASH} hash its index.json "
                        "records (damaged in place); re-convert the dataset or restore the file"
                    )
        self._verified.add(shard_id)

    def _decoded(self, sample_id: int, name: str, retry: int) -> tuple[dict[str, Any], torch.Tensor, bool]:
        """The sample and its image; an undecodable one is swapped for the next good one in its shard."""
        shard_id, offset = self.spanner[sample_id]
        first = sample_id - offset
        count = int(self.samples_per_shard[shard_id])
        shard = self.shards[shard_id].file_pairs[0][0].basename
        for step in range(count):
            raw = self._stored(first + (offset + step) % count, retry)
            try:
                image = decode_stored_image(raw)
            except CorruptImageError as err:
                logger.warning("%s: image %s in %s cannot be decoded (%s)", name, raw["index"], shard, err)
                continue
            return raw, image, step > 0
        raise CorruptImageError(f"{name}: no image of {shard} decodes")

    def _stored(self, sample_id: int, retry: int) -> dict[str, Any]:
        """The raw sample; a failed background download raises its own error, not a generic one,
        and a shard that cannot be read raises an error naming it."""
        try:
            return super().get_item(sample_id, retry)
        except (DataError, StorageAccessError):
            raise
        except RuntimeError:
            if self._background_error is not None:
                raise self._background_error from None
            raise
        except Exception as err:
            raise self._shard_error(self.spanner[sample_id][0], err) from None


def _shared_memory_of(holder: object) -> list[SharedMemory]:
    """Streaming's segments held by ``holder`` (a dataset) and, recursively, by its shared-state
    helpers (SharedArray, SharedScalar, SharedBarrier hold theirs one or two levels down)."""
    found: list[SharedMemory] = []
    for value in vars(holder).values():
        if isinstance(value, SharedMemory):
            found.append(value)
        elif type(value).__module__.startswith("streaming.base.shared"):
            found += _shared_memory_of(value)
    return found
