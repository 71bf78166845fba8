"""Deep linear networks f(x) = W_L ⋯ W_1 x with a true product of rank r.

Closed form of Aoyagi (2024), "Consideration on the learning efficiency of
multiple-layered neural networks with linear units", Neural Networks 172:106132, Theorem 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from itertools import combinations

from slt.theory._validate import as_int, as_sequence
from slt.theory.coefficient import LearningCoefficient


def deep_linear(widths: Sequence[int], r: int) -> LearningCoefficient:
    """Learning coefficient of a deep linear network (Aoyagi 2024, Theorem 1).

    ``widths`` = (H_1, …, H_{L+1}): H_1 inputs, H_{L+1} outputs, W_i of shape
    H_{i+1} × H_i, and the true product W⁰_L ⋯ W⁰_1 has rank r. Let M_j = H_j − r.

    If some M_j = 0:  λ = r(H_1 + H_{L+1} − r)/2, m = 1.

    Otherwise pick Σ ⊂ {1, …, L+1}, ℓ = |Σ| − 1, with

    (i)   M_s < M_t for s ∈ Σ, t ∉ Σ;
    (ii)  Σ_{j∈Σ} M_j ≥ ℓ M_s for all s ∈ Σ;
    (iii) Σ_{j∈Σ} M_j < ℓ M_t for all t ∉ Σ,

    found by sorting the indices by M_j and growing the prefix (ties kept together) until
    (ii) and (iii) hold. With S = Σ_{j∈Σ} M_j, M̄ = ⌈S/ℓ⌉ and a = S − (M̄ − 1)ℓ:

    λ = [−r² + r(H_1 + H_{L+1})]/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4 · (S/ℓ)²
        + ½ Σ_{i<j ∈ Σ} M_i M_j,
    m = a(ℓ − a) + 1.

    A public copy of the theorem prints +r² in the first term; −r² is right (it is what
    makes L = 2 reduce to :func:`~slt.theory.reduced_rank.reduced_rank`, in λ and m).

    Parameters
    ----------
    widths : sequence of int
        (H_1, …, H_{L+1}), each ≥ 1, at least two entries (L ≥ 1; L = 1 is the regular
        model with λ = H_1 H_2 / 2).
    r : int
        Rank of the true end-to-end matrix, 0 ≤ r ≤ min(widths).

    Examples
    --------
    >>> deep_linear([2, 2, 2], 0)  # = reduced_rank(2, 2, 2, 0)
    LearningCoefficient(lam=3/2, m=1)
    >>> deep_linear([1, 1, 1, 1], 0)  # K ≍ a²b²c²
    LearningCoefficient(lam=1/2, m=3)
    """
    as_sequence(widths, "widths", "integers >= 1 (layer widths)")
    H = [as_int(h, f"widths[{i}]", minimum=1) for i, h in enumerate(widths)]
    if len(H) < 2:
        raise ValueError(f"widths must have at least 2 entries (input, output), got {H}")
    r = as_int(r, "r", minimum=0)
    if r > min(H):
        raise ValueError(f"r must satisfy 0 <= r <= min(widths) = {min(H)}, got {r}")
    base = Fraction(-(r**2) + r * (H[0] + H[-1]), 2)
    M = [h - r for h in H]
    if 0 in M:
        return LearningCoefficient(base, 1)
    sigma = _select_sigma(M)
    ell = len(sigma) - 1
    S = sum(sigma)
    M_bar = math.ceil(Fraction(S, ell))
    a = S - (M_bar - 1) * ell
    lam = (
        base
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction(ell * (ell - 1), 4) * Fraction(S, ell) ** 2
        + Fraction(sum(x * y for x, y in combinations(sigma, 2)), 2)
    )
    return LearningCoefficient(lam, a * (ell - a) + 1)


def _select_sigma(M: list[int]) -> list[int]:
    """The values {M_j : j ∈ Σ} of Aoyagi's set Σ, by growing a sorted prefix.

    Only prefixes that end between two distinct values are candidates (condition (i));
    among those, return the first with |Σ| ≥ 2 satisfying (ii) and (iii).
    """
    ordered = sorted(M)
    for size in range(2, len(ordered) + 1):
        if size < len(ordered) and ordered[size - 1] == ordered[size]:
            continue  # would split a tie: violates (i)
        prefix, ell = ordered[:size], size - 1
        total = sum(prefix)
        holds_ii = total >= ell * prefix[-1]
        holds_iii = size == len(ordered) or total < ell * ordered[size]
        if holds_ii and holds_iii:
            return prefix
    raise AssertionError(f"no admissible set Σ for M = {M}; Aoyagi 2024 guarantees one")
