"""Convert a DeepSpeed checkpoint to a universal one: `python launch/convert_checkpoint.py CHECKPOINT`."""

import sys

from dune_scale.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
