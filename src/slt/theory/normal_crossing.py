"""Closed forms for K in normal crossing form: regular models, monomials, radial powers.

For K(w) = Π_j w_j^{2k_j} and a prior φ(w) ∝ Π_j |w_j|^{h_j} near 0 the zeta function
ζ(z) = ∫ K(w)^z φ(w) dw has poles at z = −(h_j + 1)/(2k_j); the largest gives λ and
the number of coordinates attaining it gives m (Watanabe 2009, Algebraic Geometry and
Statistical Learning Theory, ch. 2 and 6).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from fractions import Fraction

from slt.theory._validate import as_int, as_sequence
from slt.theory.coefficient import LearningCoefficient


def regular(d: int) -> LearningCoefficient:
    """Learning coefficient of a regular model with ``d`` parameters: λ = d/2, m = 1.

    A positive definite Fisher information makes K locally a non-degenerate quadratic form
    (Watanabe 2009, Algebraic Geometry and Statistical Learning Theory).

    Parameters
    ----------
    d : int
        Number of parameters, d ≥ 1.

    Examples
    --------
    >>> regular(3)
    LearningCoefficient(lam=3/2, m=1)
    """
    d = as_int(d, "d", minimum=1)
    return LearningCoefficient(Fraction(d, 2), 1)


def monomial(k: Sequence[int], h: Sequence[int | Fraction] | None = None) -> LearningCoefficient:
    """Learning coefficient of K = Π_j w_j^{2 k_j} under a prior ∝ Π_j |w_j|^{h_j}.

    λ = min_j (h_j + 1) / (2 k_j),  m = #{j : (h_j + 1)/(2 k_j) = λ}

    (Watanabe 2009, Algebraic Geometry and Statistical Learning Theory, ch. 2 and 6).

    Parameters
    ----------
    k : sequence of int
        Exponents k_j ≥ 0. A coordinate with k_j = 0 does not occur in K: it contributes
        no pole and is ignored (its h_j is then irrelevant). At least one k_j must be ≥ 1.
    h : sequence of int or Fraction, optional
        Prior exponents h_j > −1, one per coordinate; ``None`` means a prior positive at
        the origin (all h_j = 0).

    Examples
    --------
    >>> monomial([1, 1])  # a²b²
    LearningCoefficient(lam=1/2, m=2)
    >>> monomial([1, 2])  # a²b⁴
    LearningCoefficient(lam=1/4, m=1)
    >>> monomial([1, 1], h=[0, 2])  # a²b² with prior ∝ |b|²
    LearningCoefficient(lam=1/2, m=1)
    """
    as_sequence(k, "k", "integers >= 0, one per coordinate")
    ks = [as_int(kj, f"k[{j}]", minimum=0) for j, kj in enumerate(k)]
    if h is None:
        hs = [Fraction(0)] * len(ks)
    else:
        as_sequence(h, "h", "ints or Fractions > -1, one per coordinate")
        hs = [_prior_exponent(hj, f"h[{j}]") for j, hj in enumerate(h)]
        if len(hs) != len(ks):
            raise ValueError(f"h must have one entry per entry of k ({len(ks)}), got {len(hs)}")
    poles = [(hj + 1) / (2 * kj) for kj, hj in zip(ks, hs, strict=True) if kj > 0]
    if not poles:
        raise ValueError(f"k must contain at least one exponent >= 1, got {list(ks)}")
    lam = min(poles)
    return LearningCoefficient(lam, poles.count(lam))


def radial(d: int, k: int) -> LearningCoefficient:
    """Learning coefficient of K = |w|^{2k} in ``d`` dimensions: λ = d/(2k), m = 1.

    In polar coordinates K = ρ^{2k} and dw = ρ^{d−1} dρ dΩ, so the only pole is
    z = −d/(2k), simple (Watanabe 2009, Algebraic Geometry and Statistical Learning
    Theory, ch. 2).

    Parameters
    ----------
    d : int
        Dimension, d ≥ 1.
    k : int
        Power, k ≥ 1.

    Examples
    --------
    >>> radial(3, 2)
    LearningCoefficient(lam=3/4, m=1)
    """
    d = as_int(d, "d", minimum=1)
    k = as_int(k, "k", minimum=1)
    return LearningCoefficient(Fraction(d, 2 * k), 1)


def _prior_exponent(value: object, name: str) -> Fraction:
    if isinstance(value, Fraction):
        exponent = value
    elif isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an int or Fraction greater than -1, got {value!r}")
    else:
        exponent = Fraction(operator.index(value))
    if exponent <= -1:
        raise ValueError(f"{name} must be greater than -1, got {exponent}")
    return exponent
