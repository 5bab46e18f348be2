"""Prepare the whole mixture from its official layouts: `python launch/prepare_data.py SOURCES.yaml OUT [...]`."""

import sys

from dune_scale.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
