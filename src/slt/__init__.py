"""slt: singular learning theory, measured on real PyTorch models."""

from slt.chains import DivergenceError
from slt.llc import LLCResult, estimate_llc
from slt.losses import gaussian_nll, supervised

__version__ = "0.1.0"

__all__ = [
    "DivergenceError",
    "LLCResult",
    "__version__",
    "estimate_llc",
    "gaussian_nll",
    "supervised",
]
