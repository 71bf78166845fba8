"""The result type: a learning coefficient λ (exact rational) and its multiplicity m.

Near a true parameter the free energy expands as
F_n = n L_n(w0) + λ log n − (m − 1) log log n + O_p(1) (Watanabe 2009, main formula II),
so (λ, m) is the whole asymptotic content of a singularity.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class LearningCoefficient:
    """A learning coefficient λ (real log canonical threshold) with multiplicity m.

    Attributes
    ----------
    lam : Fraction
        λ > 0, exact. Integers are accepted and stored as ``Fraction``.
    m : int
        Multiplicity (order of the largest pole of the zeta function), m ≥ 1.

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
        if isinstance(lam, bool) or not isinstance(lam, int | Fraction):
            raise TypeError(f"lam must be a Fraction or int, got {lam!r}")
        if lam <= 0:
            raise ValueError(f"lam must be positive, got {lam}")
        m = self.m
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        object.__setattr__(self, "lam", Fraction(lam))

    def __float__(self) -> float:
        return float(self.lam)

    def __iter__(self) -> Iterator[Fraction | int]:
        """Unpack as ``lam, m = coefficient``."""
        return iter((self.lam, self.m))

    def __repr__(self) -> str:
        return f"LearningCoefficient(lam={self.lam}, m={self.m})"
