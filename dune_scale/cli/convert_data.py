"""``launch/convert_data.py``: images on disk → MDS shards of one dataset (train or val split)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dune_scale.data.convert import DEFAULT_MAX_PIXELS, LABELS, LAYOUTS, REPORT_NAME, SPLITS, convert_dataset
from dune_scale.data.errors import DataError


def add_shard_options(parser: argparse.ArgumentParser) -> None:
    """The options every conversion program shares: how shards are cut, images stored, storage reached."""
    parser.add_argument("--samples-per-shard", type=int, default=512, help="images per shard (default 512, ~50 MB of ImageNet JPEGs)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"downscale larger images to this many pixels (default {DEFAULT_MAX_PIXELS:,}; 0: no limit)",
    )
    parser.add_argument(
        "--quality", type=int, default=None,
        help="re-encode non-JPEG images as JPEG at this quality (default: keep JPEG/PNG/WebP bytes, others as PNG)",
    )
    parser.add_argument("--s3-endpoint-url", default=None, help="S3-compatible store endpoint (else S3_ENDPOINT_URL)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer before a storage call fails")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Sequence[str] | None = None) -> int:
    """Convert one dataset, print a summary; exit 0 (1 if nothing was written, 2 on bad input)."""
    parser = argparse.ArgumentParser(
        description="Convert a dataset of images into MDS shards: the training split to OUT/NAME, "
        "the validation split (--split val) to OUT/NAME/val.",
    )
    parser.add_argument("source", help="image folder, class folders (ImageFolder), a file list, or a glob pattern")
    parser.add_argument("out", help="output root: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("--name", required=True, help="dataset name (= folder name the mixture refers to)")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="how SOURCE lists images (default: guess)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="which split SOURCE holds (default train)")
    parser.add_argument("--labels", choices=LABELS, default="none",
                        help="folders: store each image's class (its ImageFolder sub-folder) as a label column, for k-NN sets")
    add_shard_options(parser)
    args = parser.parse_args(argv)
    try:
        report = convert_dataset(
            args.source,
            args.out,
            args.name,
            layout=args.layout,
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            quality=args.quality,
            max_pixels=args.max_pixels,
            split=args.split,
            s3_endpoint_url=args.s3_endpoint_url,
            timeout=args.timeout,
            progress=not args.no_progress,
            labels=args.labels,
        )
    except (ValueError, OSError, DataError) as err:  # bad arguments or sources, unreachable or refusing storage
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{report.dataset}: {report.written} of {report.files} images in {report.shards} shards at {report.output} "
        f"({report.reencoded} re-encoded, {len(report.downscaled)} downscaled, {report.rotated} rotated at load, "
        f"{report.chunks_reused} shards kept from an earlier run, {len(report.skipped)} skipped; "
        f"see {report.output}/{REPORT_NAME})"
    )
    for item in report.downscaled[:20]:
        print(f"  downscaled {item['path']}: {item['from'][0]}x{item['from'][1]} -> {item['to'][0]}x{item['to'][1]}")
    for item in report.skipped[:20]:
        print(f"  skipped {item['path']}: {item['error']}")
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more")
    return 0 if report.written else 1
