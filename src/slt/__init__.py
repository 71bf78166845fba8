"""slt: singular learning theory, measured on real PyTorch models."""

import importlib

from slt.calibrate import CalibrationResult, calibrate
from slt.chains import DivergenceError
from slt.llc import LLCResult, estimate_llc
from slt.losses import gaussian_nll, next_token_nll, supervised
from slt.nbeta import NbetaSweep, llc_vs_nbeta
from slt.plots import plot_trace  # matplotlib is imported only when a plot is drawn

__version__ = "0.1.0"


def load(path):
    """Read a result saved by ``LLCResult.save`` (:func:`slt.io.load`; needs ``slt[io]``)."""
    from slt.io import load as _load

    return _load(path)


_SUBMODULES = ("theory", "zoo", "validate", "diagnostics", "io", "checkpoints", "evidence")
_LAZY = {
    "bic": "slt.evidence",
    "laplace": "slt.evidence",
    "estimate_lambda_m": "slt.evidence",
    "quadrature_free_energy": "slt.evidence",
    "free_energy": "slt.evidence",
    "wbic": "slt.evidence",
    "waic": "slt.evidence",
    "plot_evidence": "slt.evidence",
    "evidence_curves": "slt.evidence",
    "llc_trajectory": "slt.trajectory",
    "Trajectory": "slt.trajectory",
    "SettingsChangedError": "slt.trajectory_file",
    "detect_transitions": "slt.transitions",
    "phase_diagram": "slt.phase",
    "plot_trajectory": "slt.plots_development",
    "plot_phase_diagram": "slt.plots_development",
}


def __getattr__(name):
    """``slt.zoo``, ``slt.theory``, ``slt.bic``, ... imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"slt.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slt' has no attribute {name!r}")


__all__ = [
    "evidence_curves",
    "free_energy",
    "plot_evidence",
    "waic",
    "wbic",
    "SettingsChangedError",
    "Trajectory",
    "detect_transitions",
    "llc_trajectory",
    "phase_diagram",
    "plot_phase_diagram",
    "plot_trajectory",
    "CalibrationResult",
    "DivergenceError",
    "NbetaSweep",
    "LLCResult",
    "__version__",
    "bic",
    "calibrate",
    "estimate_lambda_m",
    "estimate_llc",
    "gaussian_nll",
    "laplace",
    "llc_vs_nbeta",
    "load",
    "next_token_nll",
    "plot_trace",
    "quadrature_free_energy",
    "supervised",
]
