"""Print the scale model (per-step communication, data, checkpoints, predicted img/s per GPU) as markdown tables."""

import sys

from dune_scale.cli.scale_model import main

if __name__ == "__main__":
    sys.exit(main())
