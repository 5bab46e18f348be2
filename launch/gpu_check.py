"""GPU acceptance (`make gpu-check`): `python launch/gpu_check.py [--out runs/gpu-check --batch 64 --steps 10 --variants "k=v" ...]`."""

import sys

from dune_scale.cli.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
