"""Data-loader benchmark: `python launch/bench_data.py [--remote-root ROOT] [--sizes 336 448] [--workers 1 2 4 8]`."""

import sys

from dune_scale.cli.bench_data import main

if __name__ == "__main__":
    sys.exit(main())
