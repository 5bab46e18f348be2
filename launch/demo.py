"""`make demo`: synthetic shards → tiny_cpu training on CPU → loss summary: `python launch/demo.py [k=v ...]`."""

import sys

from dune_scale.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
