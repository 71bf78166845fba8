"""Closed-form learning coefficients (λ, m) from the singular learning theory literature.

Pure Python, exact: λ is a :class:`fractions.Fraction`, m an ``int``. Every formula and its
source are in THEORY.md and in each function's docstring.
"""

from slt.theory.coefficient import LearningCoefficient
from slt.theory.deep_linear import deep_linear
from slt.theory.mixture import two_component_mixture
from slt.theory.normal_crossing import monomial, radial, regular
from slt.theory.reduced_rank import reduced_rank
from slt.theory.rules import product_rule, sum_rule
from slt.theory.tanh import tanh_1d

__all__ = [
    "LearningCoefficient",
    "deep_linear",
    "monomial",
    "product_rule",
    "radial",
    "reduced_rank",
    "regular",
    "sum_rule",
    "tanh_1d",
    "two_component_mixture",
]
