"""GPU benchmark of the fused projector loss: `python launch/bench_loss.py [--out FILE] [...]`."""

import sys

from dune_scale.cli.bench_loss import main

if __name__ == "__main__":
    sys.exit(main())
