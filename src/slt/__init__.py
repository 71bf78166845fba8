"""slt: singular learning theory, measured on real PyTorch models."""

from slt.chains import DivergenceError
from slt.llc import LLCResult, estimate_llc
from slt.losses import gaussian_nll, supervised
from slt.plots import plot_trace  # matplotlib is imported only when a plot is drawn

__version__ = "0.1.0"


def load(path):
    """Read a result saved by ``LLCResult.save`` (:func:`slt.io.load`; needs ``slt[io]``)."""
    from slt.io import load as _load

    return _load(path)


__all__ = [
    "DivergenceError",
    "LLCResult",
    "__version__",
    "estimate_llc",
    "gaussian_nll",
    "load",
    "plot_trace",
    "supervised",
]
