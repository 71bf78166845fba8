"""Composition rules for K built from functions of disjoint groups of variables.

Let K_1, …, K_s depend on disjoint sets of coordinates, with a prior that factorises over
the groups, and let (λ_i, m_i) be their learning coefficients. Then
(Watanabe 2009, Algebraic Geometry and Statistical Learning Theory, ch. 2 and 6; THEORY.md):

- the **product** K = Π K_i has ζ(z) = Π ζ_i(z) (Fubini), so λ = min λ_i and
  m = Σ of the m_i with λ_i = λ (orders of coinciding poles add);
- the **sum** K = Σ K_i has a state density v(t) that is the convolution of the pieces'
  v_i(t) ∝ t^{λ_i − 1} (−log t)^{m_i − 1}, so λ = Σ λ_i and m − 1 = Σ (m_i − 1),
  i.e. m = Σ m_i − (s − 1).
"""

from __future__ import annotations

from fractions import Fraction

from slt.theory.coefficient import LearningCoefficient


def sum_rule(*coeffs: LearningCoefficient) -> LearningCoefficient:
    """Learning coefficient of K = Σ_i K_i over disjoint variable groups.

    λ = Σ_i λ_i,  m = Σ_i m_i − (s − 1),  s = number of terms.

    Parameters
    ----------
    *coeffs : LearningCoefficient
        The (λ_i, m_i) of each term, at least one.

    Examples
    --------
    >>> from slt.theory.normal_crossing import monomial
    >>> sum_rule(monomial([1]), monomial([1, 1]))  # a² + b²c²
    LearningCoefficient(lam=1, m=2)
    """
    _check(coeffs, "sum_rule")
    lam = sum((c.lam for c in coeffs), Fraction(0))
    return LearningCoefficient(lam, sum(c.m for c in coeffs) - (len(coeffs) - 1))


def product_rule(*coeffs: LearningCoefficient) -> LearningCoefficient:
    """Learning coefficient of K = Π_i K_i over disjoint variable groups.

    λ = min_i λ_i,  m = Σ_{i : λ_i = λ} m_i.

    Parameters
    ----------
    *coeffs : LearningCoefficient
        The (λ_i, m_i) of each factor, at least one.

    Examples
    --------
    >>> from slt.theory.normal_crossing import monomial, radial
    >>> product_rule(monomial([1]), monomial([1]))  # a² · b²
    LearningCoefficient(lam=1/2, m=2)
    >>> product_rule(radial(3, 1), monomial([1]))  # |a|² · b², a ∈ R³
    LearningCoefficient(lam=1/2, m=1)
    """
    _check(coeffs, "product_rule")
    lam = min(c.lam for c in coeffs)
    return LearningCoefficient(lam, sum(c.m for c in coeffs if c.lam == lam))


def _check(coeffs: tuple[LearningCoefficient, ...], caller: str) -> None:
    if not coeffs:
        raise ValueError(f"{caller} needs at least one LearningCoefficient, got none")
    for i, c in enumerate(coeffs):
        if not isinstance(c, LearningCoefficient):
            raise TypeError(f"coeffs[{i}] must be a LearningCoefficient, got {c!r}")
