"""`python -m keras_mwbp`: the same as the `keras-mwbp` command."""

import sys

from keras_mwbp.cli import main

if __name__ == "__main__":
    sys.exit(main())
