"""Evidence: the Bayes free energy F_n, exactly for small models, and its approximations.

- :func:`quadrature_free_energy` — F(β) = -log ∫ exp(-nβ L_n) φ for d ≤ 3, with an error
  bound, and :func:`module_nll` to integrate an ``nn.Module``.
- :func:`bic`, :func:`laplace` — the regular-model baselines, with the Hessian's near-zero
  eigenvalues and rank reported.
- :func:`estimate_lambda_m` — λ and m from λ̂ over a range of nβ.
"""

from slt.evidence.baselines import BICResult, LaplaceResult, bic, laplace
from slt.evidence.functional import module_nll
from slt.evidence.lambda_m import LambdaMResult, estimate_lambda_m
from slt.evidence.quadrature import QuadratureResult, quadrature_free_energy
from slt.evidence.spectrum import hessian_spectrum

__all__ = [
    "BICResult",
    "LambdaMResult",
    "LaplaceResult",
    "QuadratureResult",
    "bic",
    "estimate_lambda_m",
    "hessian_spectrum",
    "laplace",
    "module_nll",
    "quadrature_free_energy",
]
