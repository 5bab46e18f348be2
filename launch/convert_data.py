"""Convert images on disk into MDS shards: `python launch/convert_data.py SOURCE OUT --name NAME [...]`."""

import sys

from dune_scale.data.convert import main

if __name__ == "__main__":
    sys.exit(main())
