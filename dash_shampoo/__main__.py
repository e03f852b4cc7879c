"""``python -m dash_shampoo``: the same commands as ``dash-shampoo``."""

import sys

from .cli import main

sys.exit(main())
