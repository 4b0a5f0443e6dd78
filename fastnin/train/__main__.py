"""`python -m fastnin.train ...` and the console script `fastnin-train` (see fastnin/train/loop.py)."""

import sys

from .loop import main

if __name__ == "__main__":
    sys.exit(main())
