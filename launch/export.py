"""Export a trained student to the official DUNE .pth, timm or a Hugging Face-style folder."""

import sys

from dune_scale.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
