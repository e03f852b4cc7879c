"""``python -m dash_shampoo.train`` (also under ``torchrun``): the same options as ``dash-shampoo train``."""

import sys

from .trainer import main

sys.exit(main())
