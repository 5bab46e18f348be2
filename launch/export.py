"""Export a trained student (the official DUNE .pth, timm, a Hugging Face-style folder, ONNX: see --help)."""

import sys

from dune_scale.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
