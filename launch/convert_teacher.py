"""Convert an official teacher checkpoint to safetensors + JSON: `python launch/convert_teacher.py TEACHER FILE OUT`."""

import sys

from dune_scale.cli.convert_teacher import main

if __name__ == "__main__":
    sys.exit(main())
