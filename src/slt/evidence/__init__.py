"""Evidence: the Bayes free energy F_n, exactly for small models, and its approximations.

- :func:`quadrature_free_energy` — F(β) = -log ∫ exp(-nβ L_n) φ for d ≤ 3, with an error
  bound, and :func:`module_nll` to integrate an ``nn.Module``.
- :func:`free_energy` — F_n by thermodynamic integration over a ladder of temperatures.
- :func:`wbic` — WBIC = E_β[n L_n] at β = 1/log n, and λ̂ from two temperatures.
- :func:`waic` — WAIC, T_n, V_n and the singular fluctuation ν, streamed over draws.
- :func:`bic`, :func:`laplace` — the regular-model baselines, with the Hessian's near-zero
  eigenvalues and rank reported.
- :func:`estimate_lambda_m` — λ and m from λ̂ over a range of nβ.
- :func:`evidence_curves`, :func:`plot_evidence` — all of them over a range of n, with the
  slopes in log n.
"""

from slt.evidence.baselines import BICResult, LaplaceResult, bic, laplace
from slt.evidence.curves import EvidenceCurves, evidence_curves, plot_evidence
from slt.evidence.functional import module_nll
from slt.evidence.lambda_m import LambdaMResult, estimate_lambda_m
from slt.evidence.quadrature import QuadratureResult, quadrature_free_energy
from slt.evidence.spectrum import hessian_spectrum
from slt.evidence.thermodynamic import FreeEnergyResult, free_energy
from slt.evidence.waic import WAICResult, waic
from slt.evidence.wbic import WBICResult, wbic

__all__ = [
    "BICResult",
    "EvidenceCurves",
    "FreeEnergyResult",
    "LambdaMResult",
    "LaplaceResult",
    "QuadratureResult",
    "WAICResult",
    "WBICResult",
    "bic",
    "estimate_lambda_m",
    "evidence_curves",
    "free_energy",
    "hessian_spectrum",
    "laplace",
    "module_nll",
    "plot_evidence",
    "quadrature_free_energy",
    "waic",
    "wbic",
]
