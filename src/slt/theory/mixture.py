"""Two-component Gaussian mixture with one component's weight and mean unknown."""

from __future__ import annotations

from fractions import Fraction

from slt.theory.coefficient import LearningCoefficient


def two_component_mixture() -> LearningCoefficient:
    """Learning coefficient of (1 − a) N(0, 1) + a N(b, 1) at the truth N(0, 1): (1/2, 2).

    Near the truth p(x)/φ(x) − 1 = a(e^{bx − b²/2} − 1) = a b x + O(a b²), so K ≍ a² b²,
    a normal crossing with λ = 1/2 and m = 2 (Watanabe 2009, Algebraic Geometry and
    Statistical Learning Theory; THEORY.md).

    Examples
    --------
    >>> two_component_mixture()
    LearningCoefficient(lam=1/2, m=2)
    """
    return LearningCoefficient(Fraction(1, 2), 2)
