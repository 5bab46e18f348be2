"""Benchmark the training step: `python|torchrun|deepspeed launch/bench.py --config configs/X.yaml
[k=v ...] [--steps N --warmup W --data --random-init --peak-tflops F --json PATH --reference
[--reference-variants seed,compiled] --variants "k=v" ...]`."""

import sys

from dune_scale.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
