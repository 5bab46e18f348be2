"""Train a DUNE student: `python|torchrun|deepspeed launch/train.py --config configs/X.yaml [k=v ...]`."""

import sys

from dune_scale.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
