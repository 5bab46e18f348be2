"""PCA feature maps of a trained student (and its teachers) for a few images, as one PNG grid."""

import sys

from dune_scale.cli.pca import main

if __name__ == "__main__":
    sys.exit(main())
