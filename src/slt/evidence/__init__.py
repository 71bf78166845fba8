"""Evidence: the Bayes free energy and its approximations (placeholder exports)."""

from slt.evidence.functional import module_nll
from slt.evidence.quadrature import QuadratureResult, quadrature_free_energy

__all__ = ["QuadratureResult", "module_nll", "quadrature_free_energy"]
