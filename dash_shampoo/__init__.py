"""dash-shampoo: DASH, batched block Shampoo for PyTorch."""

from . import linalg
from .linalg import inverse_root
from .optimizer import DASH

__version__ = "0.1.0"

__all__ = ["DASH", "__version__", "inverse_root", "linalg"]
