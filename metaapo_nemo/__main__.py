"""``python -m metaapo_nemo`` = ``metaapo-nemo`` (also ``torchrun ... -m metaapo_nemo train ...``)."""

import sys

from metaapo_nemo.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
