"""`make demo`: synthetic MDS shards → tiny_cpu training on CPU (~60 steps) → loss summary.

Starts fresh each time (the demo's own output folder, ``runs/demo`` under the current directory, is
replaced, once the arguments are read and the configuration is valid); real runs resume instead.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from statistics import mean

from dune_scale.cli.common import run_program
from dune_scale.cli.train import train
from dune_scale.config import load_config, recipe_path
from dune_scale.data import write_demo_shards
from dune_scale.engine.run_files import CHECKPOINTS, CONFIG, METRICS
from dune_scale.telemetry.metrics import read_metrics

DEMO_DIR = Path("runs") / "demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/tiny_cpu.yaml")
    args = parser.parse_args(argv)
    return run_program(lambda: _demo(args.overrides))


def _demo(overrides: list[str]) -> int:
    shards = DEMO_DIR / "shards"
    cfg = load_config(
        recipe_path("tiny_cpu"),
        [f"run.output_dir={DEMO_DIR / 'run'}", f"data.remote_root={shards}", *overrides],
    )
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    write_demo_shards(shards)
    train(cfg)
    output = Path(cfg.run.output_dir)
    records = [r for r in read_metrics(output / METRICS) if r.get("kind", "train") == "train"]
    first, last = mean(r["loss"] for r in records[:10]), mean(r["loss"] for r in records[-10:])
    print(f"\nloss, mean of the first 10 steps: {first:.4f}; of the last 10: {last:.4f}")
    print(f"shards:       {shards}")
    print(f"metrics:      {output / METRICS}")
    print(f"config:       {output / CONFIG}")
    print(f"checkpoints:  {output / CHECKPOINTS}")
    if last >= first:
        print("the loss did not fall: something is wrong", file=sys.stderr)
        return 1
    return 0
