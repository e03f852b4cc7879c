"""dash-shampoo: DASH, batched block Shampoo for PyTorch."""

from . import linalg
from .linalg import inverse_root

__version__ = "0.1.0"

__all__ = ["__version__", "inverse_root", "linalg"]
