"""Convert images on disk into MDS shards: `python launch/convert_data.py SOURCE OUT --name NAME [...]`."""

import sys

from dune_scale.cli.convert_data import main

if __name__ == "__main__":
    sys.exit(main())
