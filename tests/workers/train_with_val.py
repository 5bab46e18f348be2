"""launch/train.py with synthetic held-out sets: every rank validates its own share of each batch."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the synthetic sets

from test_eval import NAMES, val_batches

from dune_scale.cli.train import parse_args, train


def rank_share(batches: list[dict], rank: int, world: int) -> list[dict]:
    share = []
    for batch in batches:
        rows = slice(rank * len(batch["images"]) // world, (rank + 1) * len(batch["images"]) // world)
        share.append({"images": batch["images"][rows], "dataset": batch["dataset"][rows], "index": batch["index"][rows]})
    return share


if __name__ == "__main__":
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    loaders = [rank_share(val_batches(name, 12), rank, world) for name in NAMES]
    sys.exit(0 if train(parse_args(sys.argv[1:]), val=(NAMES, loaders)) else 75)
