"""The result type: a learning coefficient λ (exact rational) and its multiplicity m.

Near a true parameter the free energy expands as
F_n = n L_n(w0) + λ log n − (m − 1) log log n + O_p(1) (Watanabe 2009, main formula II),
so (λ, m) is the whole asymptotic content of a singularity.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from slt.theory._validate import as_int


@dataclass(frozen=True)
class LearningCoefficient:
    """A learning coefficient λ (real log canonical threshold) with multiplicity m.

    Attributes
    ----------
    lam : Fraction
        λ > 0, exact. Integers (numpy's too) are accepted and stored as ``Fraction``;
        floats are refused (pass ``Fraction(1, 2)``, not 0.5).
    m : int
        Multiplicity (order of the largest pole of the zeta function), m ≥ 1; numpy
        integers are stored as ``int``.

    Examples
    --------
    >>> c = LearningCoefficient(Fraction(3, 2), 1)
    >>> c
    LearningCoefficient(lam=3/2, m=1)
    >>> float(c)
    1.5
    >>> lam, m = c
    >>> lam, m
    (Fraction(3, 2), 1)
    """

    lam: Fraction
    m: int

    def __post_init__(self) -> None:
        lam = self.lam
        if isinstance(lam, numbers.Real) and not isinstance(lam, numbers.Rational):
            raise TypeError(
                f"lam must be exact, a Fraction or an integer, got the float {lam!r}; pass "
                "a Fraction, e.g. Fraction(1, 2) or Fraction('0.25')"
            )
        if isinstance(lam, bool) or not isinstance(lam, numbers.Rational):
            raise TypeError(f"lam must be a Fraction or an integer, got {lam!r}")
        lam = Fraction(int(lam.numerator), int(lam.denominator))
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        object.__setattr__(self, "lam", lam)
        object.__setattr__(self, "m", as_int(self.m, "m", minimum=1))

    def __float__(self) -> float:
        return float(self.lam)

    def __iter__(self) -> Iterator[Fraction | int]:
        """Unpack as ``lam, m = coefficient``."""
        return iter((self.lam, self.m))

    def __repr__(self) -> str:
        return f"LearningCoefficient(lam={self.lam}, m={self.m})"
