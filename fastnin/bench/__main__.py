"""`python -m fastnin.bench`: see fastnin.bench."""

import sys

from . import main

sys.exit(main())
