"""``python -m dash_shampoo.train`` (also under ``torchrun``): the same options as ``dash-shampoo train``."""

import os
import sys

from ..distributed import exit_without_finalizing
from .trainer import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: see exit_without_finalizing
    exit_without_finalizing(code)
sys.exit(code)
