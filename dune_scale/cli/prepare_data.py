"""``launch/prepare_data.py SOURCES.yaml OUT``: the whole mixture, from naver/dune's dataset layouts, to MDS."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dune_scale.cli.convert_data import add_shard_options
from dune_scale.data.errors import DataError
from dune_scale.data.prepare import Part, Settings, format_report, prepare_mixture


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the mixture, print the report table; exit 0 (this run's share done), 1 (``--merge``
    found splits whose parts are not all converted yet), 2 (bad input or a count ``--strict-counts`` refuses)."""
    parser = argparse.ArgumentParser(
        description="Convert every dataset of the recipe's mixture, both splits where the official code has a "
        "validation split, from the layouts naver/dune's loaders read (paths given in SOURCES.yaml, as in its "
        "data/paths.py) into OUT/<name> and OUT/<name>/val.",
    )
    parser.add_argument("sources", help="SOURCES.yaml: dataset name → its root (or list / cache pickle), plus mast3r_cache and ubody_pkl")
    parser.add_argument("out", help="output root: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("--mixture", default="teacher_balanced", help="the mixture whose datasets and official counts to use (default teacher_balanced)")
    parser.add_argument("--only", default=None, help="comma-separated dataset names: prepare only these")
    parser.add_argument("--part", default="0/1", help="I/N: convert the I-th of N disjoint shares (I from 0, e.g. $SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--merge", action="store_true", help="convert nothing: join the parts' shards of every split whose parts are all done")
    parser.add_argument("--max-side", type=int, default=0, help="store images with their longer side at most PX pixels (default 0: as they are)")
    parser.add_argument("--strict-counts", action="store_true", help="a split whose image count differs from the recipe's is an error")
    add_shard_options(parser)
    args = parser.parse_args(argv)
    try:
        report = prepare_mixture(
            args.sources,
            args.out,
            mixture=args.mixture,
            only=[n.strip() for n in args.only.split(",") if n.strip()] if args.only else None,
            part=Part.parse(args.part),
            merge=args.merge,
            settings=Settings(args.samples_per_shard, args.max_side, args.max_pixels, args.quality),
            workers=args.workers,
            s3_endpoint_url=args.s3_endpoint_url,
            timeout=args.timeout,
            strict_counts=args.strict_counts,
            progress=not args.no_progress,
        )
    except (ValueError, OSError, DataError) as err:  # bad SOURCES, layouts, pickles or counts; unreachable storage
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(format_report(report)))
    pending = [f"{r.dataset}/{r.split} ({r.status})" for r in report.splits if r.status not in ("converted", "complete")]
    print(f"{'complete' if not pending else 'not complete: ' + ', '.join(pending)}; report in {', '.join(report.written_to)}")
    waiting = [f"{r.dataset}/{r.split}" for r in report.splits if r.status == "partial"]
    if args.merge and waiting:
        print(
            f"--merge: {', '.join(waiting)} still miss shards (chunk k is part k mod N): run those parts, and give "
            "--merge the parts' --samples-per-shard, --max-side, --max-pixels and --quality",
            file=sys.stderr,
        )
        return 1
    return 0
