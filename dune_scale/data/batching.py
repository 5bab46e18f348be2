"""Grouped batching: every per-rank batch holds each group's share (±1), as a Streaming batching method.

Streaming's own ``stratified`` method fixes the count of every *stream* in the *global* batch and
then cuts that batch into contiguous per-rank slices, so on several ranks one rank gets mostly the
first stream, and every dataset needs at least one slot per global batch (VirtualKitti, 1,200 of
20.7M images, would need global batches of ~4,400). DUNE's balance is per teacher domain, so here:

1. each group (a teacher domain, or a single dataset under ``balance=weights``) pools its streams'
   resampled samples into one sequence: canonical-node spans interleaved, then Streaming's
   shard-aware shuffle (``py1e`` …), so datasets inside a group mix in proportion to their weight;
2. a global batch of ``G = batch × ranks`` takes each group's share of ``G`` rounded down or up
   (``batch_counts``), laid out group after group, and is dealt round-robin to the ranks (rank
   ``r`` gets positions ``r, r + R, r + 2R, …``), so every rank gets each group's count / R
   rounded down or up;
3. global batches go to DataLoader workers round-robin, the order torch's DataLoader reads them.

The global batch sequence depends on the seed, epoch, canonical nodes and ``G`` only: not on how
many workers or ranks share it, and resuming drops whole global batches.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol, Sequence

import numpy as np
from numpy.typing import NDArray
from streaming.base.batching import batching_methods
from streaming.base.shuffle import get_shuffle
from streaming.base.world import World

logger = logging.getLogger(__name__)

GROUPED = "dune_grouped"
_GROUP_SEED_STRIDE = 1_000_003


class GroupedDataset(Protocol):
    """What grouped batching reads of a dataset: Streaming's resampling and shuffle settings, and the
    mixture's groups (``MixtureDataset`` is one; this module needs nothing else of it)."""

    streams: Sequence[Any]
    batch_size: int
    num_canonical_nodes: int
    shuffle: bool
    shuffle_algo: str
    shuffle_seed: int
    shuffle_block_size: int
    group_streams: list[list[int]]
    group_shares: list[float]
    group_names: list[str]
    keep_partial_batch: bool

    def resample_streams(self, epoch: int, stream_id: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]: ...


def interleave_spans(num_samples: int, num_spans: int) -> NDArray[np.int64]:
    """Order 0..n-1 by taking one sample from each of ``num_spans`` contiguous spans in turn."""
    ids = np.arange(num_samples, dtype=np.int64)
    starts = np.arange(num_spans, dtype=np.int64) * num_samples // num_spans
    span = np.searchsorted(starts, ids, side="right") - 1
    return ids[np.lexsort((span, ids - starts[span]))]


def group_sequence(dataset: GroupedDataset, group: int, epoch: int) -> NDArray[np.int64]:
    """This epoch's sample ids of one group, in traversal order."""
    units, small_per_big = [], []
    for stream_id in dataset.group_streams[group]:
        stream_units, stream_ids = dataset.resample_streams(epoch, stream_id)
        units.append(stream_units)
        small_per_big.append(stream_ids)
    shard_units = np.concatenate(units)
    sample_ids = np.concatenate(small_per_big)
    order = interleave_spans(len(sample_ids), dataset.num_canonical_nodes)
    if dataset.shuffle:
        block = max(1, int(dataset.shuffle_block_size * dataset.group_shares[group]))
        seed = dataset.shuffle_seed + _GROUP_SEED_STRIDE * group
        shuffle = get_shuffle(dataset.shuffle_algo, shard_units, dataset.num_canonical_nodes, seed, epoch, block)
        order = shuffle[order]
    return sample_ids[order]


def batch_counts(num_batches: int, global_batch: int, shares: Sequence[float]) -> NDArray[np.int64]:
    """(batches, groups) samples of each group per global batch.

    Each count is its share of the batch rounded down or up; the samples left over by rounding down
    go to the groups that are most behind their exact share so far (ties: first group), so the
    extra sample rotates and every run of batches stays within one sample of the exact shares.
    """
    ideal = global_batch * np.asarray(shares, np.float64) / sum(shares)
    base = np.floor(ideal + 1e-9).astype(np.int64)
    counts = np.tile(base, (num_batches, 1))
    extra = global_batch - int(base.sum())
    if extra:
        credit = np.zeros(len(base))
        for row in counts:
            credit += ideal - base
            chosen = np.argsort(-np.round(credit, 9), kind="stable")[:extra]
            row[chosen] += 1
            credit[chosen] -= 1
    return counts


def _batch_plan(lengths: Sequence[int], global_batch: int, shares: Sequence[float]) -> NDArray[np.int64]:
    """Per-group counts of every global batch the groups' epoch lengths can fill."""
    upper = min(math.ceil(n / (global_batch * share)) for n, share in zip(lengths, shares)) + 1
    counts = batch_counts(upper, global_batch, shares)
    used = np.cumsum(counts, axis=0)
    return counts[: min(int(np.searchsorted(used[:, g], n, side="right")) for g, n in enumerate(lengths))]


def samples_per_epoch(dataset: GroupedDataset, global_batch: int) -> int:
    """How many samples an epoch yields over all ranks (whole global batches only)."""
    lengths = [sum(int(dataset.streams[s].choose) for s in streams) for streams in dataset.group_streams]
    return len(_batch_plan(lengths, global_batch, dataset.group_shares)) * global_batch


def global_batches(dataset: GroupedDataset, global_batch: int, epoch: int) -> NDArray[np.int64]:
    """(number of global batches, G) sample ids; a row holds the groups' samples group after group."""
    shares = dataset.group_shares
    sequences = [group_sequence(dataset, g, epoch) for g in range(len(shares))]
    counts = _batch_plan([len(seq) for seq in sequences], global_batch, shares)
    if len(counts) == 0 and not dataset.keep_partial_batch:
        first = batch_counts(1, global_batch, shares)[0]
        short = min(range(len(shares)), key=lambda g: len(sequences[g]) / first[g])
        raise ValueError(
            f"group {dataset.group_names[short]} has {len(sequences[short])} samples this epoch, fewer "
            f"than the {first[short]} it needs in one global batch of {global_batch}: use a larger "
            f"epoch_size or a smaller batch"
        )
    rows = np.empty((len(counts), global_batch), np.int64)
    column = np.cumsum(counts, axis=1) - counts
    for g, seq in enumerate(sequences):
        row = np.repeat(np.arange(len(counts)), counts[:, g])
        within = np.arange(len(row)) - np.repeat(np.cumsum(counts[:, g]) - counts[:, g], counts[:, g])
        rows[row, column[row, g] + within] = seq[: len(row)]
    if dataset.keep_partial_batch:  # one group (validation): the samples left over, -1 as padding
        rest = np.concatenate([seq[int(counts[:, g].sum()):] for g, seq in enumerate(sequences)])
        if len(rest):
            tail = np.full((1, global_batch), -1, np.int64)
            tail[0, : len(rest)] = rest
            rows = np.concatenate([rows, tail])
    return rows


def generate_work_grouped(dataset: GroupedDataset, world: World, epoch: int, sample_in_epoch: int) -> NDArray[np.int64]:
    """Streaming batching-method entry point → (nodes, ranks per node, workers, batches, batch)."""
    batch, ranks, workers = dataset.batch_size, world.num_ranks, world.workers_per_rank
    size = batch * ranks
    batches = global_batches(dataset, size, epoch)
    if sample_in_epoch % size:
        logger.warning(
            "resuming at sample %d, not a multiple of the global batch %d: restarting at the last full "
            "global batch (keep the global batch size unchanged for exact resumption)",
            sample_in_epoch,
            size,
        )
    batches = batches[min(sample_in_epoch // size, len(batches)) :]
    padding = -len(batches) % workers
    batches = np.concatenate([batches, np.full((padding, size), -1, np.int64)])
    per_worker = len(batches) // workers
    dealt = batches.reshape(len(batches), batch, ranks).transpose(0, 2, 1)
    work = dealt.reshape(per_worker, workers, ranks, batch).transpose(2, 1, 0, 3)
    return np.ascontiguousarray(work).reshape(world.num_nodes, world.ranks_per_node, workers, per_worker, batch)


def worker_positions(world: World, batch_size: int, sample_in_epoch: int, num_entries: int) -> NDArray[np.int64]:
    """Position in the epoch of every entry of this worker's flat work array (see module doc)."""
    ranks, workers = world.num_ranks, world.workers_per_rank
    size = batch_size * ranks
    entry = np.arange(num_entries, dtype=np.int64)
    row = sample_in_epoch // size + (entry // batch_size) * workers + world.worker_of_rank
    return row * size + (entry % batch_size) * ranks + world.rank


def register_grouped_batching() -> None:
    """Make :data:`GROUPED` known to Streaming's batching registry (idempotent). Called where the
    work is generated, in whichever process that is, rather than as a side effect of an import."""
    batching_methods.setdefault(GROUPED, generate_work_grouped)
