"""Evaluate a trained student: `python launch/eval.py knn --checkpoint RUN_OR_FILE --train DIR --val DIR`."""

import sys

from dune_scale.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
