"""Teacher precision modes vs fp32 on full-size trained-like teachers: `python launch/teacher_precision.py [--depth 24 ...]`."""

import sys

from dune_scale.cli.teacher_precision import main

if __name__ == "__main__":
    sys.exit(main())
