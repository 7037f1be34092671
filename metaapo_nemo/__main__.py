"""``python -m metaapo_nemo`` = ``metaapo-nemo`` (also ``torchrun ... -m metaapo_nemo train ...``)."""

import sys

from metaapo_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main())
