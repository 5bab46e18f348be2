"""Data-loader throughput: decoded + augmented samples/s per image size and worker count.

Measures the real training path (``build_train_loader``: MDS read, JPEG decode, DUNE augmentations,
collation) on given shards, or on synthetic 512×512 noisy JPEGs (~100 kB, about an ImageNet photo's
size and decode cost) when none are given. The first batches are not timed: they include forking workers and opening shards.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Sequence

from dune_scale.config import DataConfig
from dune_scale.data.loader import build_train_loader
from dune_scale.data.mixture import Mixture, resolve_mixture
from dune_scale.data.synthetic import DEMO_DATASETS, write_synthetic_dataset


@dataclass(frozen=True)
class BenchResult:
    image_size: int
    workers: int
    batch_size: int
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def measure(
    data_cfg: DataConfig, mixture: Mixture, image_size: int, workers: int, batch_size: int, batches: int, warmup: int
) -> BenchResult:
    """Time ``batches`` batches after ``warmup`` untimed ones, with ``workers`` loader workers."""
    cfg = dataclasses.replace(data_cfg, num_workers=workers)
    epoch = (batches + warmup + 1) * batch_size
    loader = build_train_loader(cfg, mixture, image_size=image_size, batch_size=batch_size, seed=0, epoch_size=epoch)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    samples = sum(len(next(iterator)["index"]) for _ in range(batches))
    seconds = time.perf_counter() - start
    del iterator
    return BenchResult(image_size, workers, batch_size, samples, seconds)


def synthetic_mixture(root: str, samples: int, image_size: int = 512, noise: float = 12.0) -> list[dict[str, Any]]:
    """One photo-sized synthetic dataset per teacher domain under ``root``; their mixture list."""
    mixture = []
    for seed, (name, domain) in enumerate(DEMO_DATASETS):
        write_synthetic_dataset(root, name, samples, image_size, seed, shard_size_limit=1 << 24, noise=noise)
        mixture.append({"name": name, "domain": domain})
    return mixture


def main(argv: Sequence[str] | None = None) -> int:
    """``launch/bench_data.py``: print samples/s for every (image size, worker count)."""
    parser = argparse.ArgumentParser(description="Data-loader throughput (decode + augment + collate), samples/s.")
    parser.add_argument("--remote-root", default=None, help="shards to read (default: synthetic 512 px JPEGs in a temp dir)")
    parser.add_argument("--mixture", default="teacher_balanced", help="mixture name, with --remote-root")
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 448])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--s3-endpoint-url", default=None)
    parser.add_argument("--local-cache", default="")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dune_bench_") as tmp:
        if args.remote_root is None:
            root, mixture = tmp, synthetic_mixture(tmp, samples=max(64, args.batch_size))
        else:
            root, mixture = args.remote_root, args.mixture
        cfg = DataConfig(remote_root=root, mixture=mixture, local_cache=args.local_cache, s3_endpoint_url=args.s3_endpoint_url)
        resolved = resolve_mixture(cfg.mixture, cfg.balance, cfg.remote_root)
        print(f"{'size':>5} {'workers':>8} {'samples/s':>10}   (batch {args.batch_size}, {args.batches} timed batches)")
        for size in args.sizes:
            for workers in args.workers:
                result = measure(cfg, resolved, size, workers, args.batch_size, args.batches, args.warmup)
                print(f"{size:>5} {workers:>8} {result.samples_per_s:>10.1f}", flush=True)
    return 0
