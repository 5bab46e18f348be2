"""Probe frozen features: `python launch/eval.py {knn,linear-seg,depth} --checkpoint RUN_OR_FILE ...`
(or `--teacher NAME --config RUN`), and `python launch/eval.py report RUN` for the results table."""

import sys

from dune_scale.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
