"""Reduced rank regression: y = B A x + noise with A of shape H×M and B of shape N×H.

Closed form of Aoyagi & Watanabe (2005), "Stochastic complexities of reduced rank
regression in Bayesian estimation", Neural Networks 18(7):924–933, main theorem.
"""

from __future__ import annotations

from fractions import Fraction

from slt.theory._validate import as_int
from slt.theory.coefficient import LearningCoefficient


def reduced_rank(M: int, N: int, H: int, r: int) -> LearningCoefficient:
    """Learning coefficient of reduced rank regression (Aoyagi & Watanabe 2005).

    The model is y = B A x + noise with A ∈ R^{H×M}, B ∈ R^{N×H} (M inputs, H hidden,
    N outputs) and a true product of rank r. With the four exclusive cases

    1. N + r ≤ M + H, M + r ≤ N + H and H + r ≤ M + N:
       λ = [2(H + r)(M + N) − (M − N)² − (H + r)² + s] / 8, where
       s = 0, m = 1 if M + H + N + r is even and s = 1, m = 2 if it is odd;
    2. M + H < N + r:  λ = (HM − Hr + Nr)/2, m = 1;
    3. N + H < M + r:  λ = (HN − Hr + Mr)/2, m = 1;
    4. M + N < H + r:  λ = MN/2, m = 1.

    Source: Aoyagi & Watanabe 2005, Neural Networks 18(7), main theorem. At H = r this is
    r(M + N − r)/2, and λ(M, N, H, r) = r(M + N − r)/2 + λ(M − r, N − r, H − r, 0).

    Parameters
    ----------
    M : int
        Input dimension, M ≥ 1.
    N : int
        Output dimension, N ≥ 1.
    H : int
        Inner (hidden) dimension, H ≥ 1.
    r : int
        Rank of the true product B₀A₀, 0 ≤ r ≤ min(M, N, H).

    Examples
    --------
    >>> reduced_rank(2, 2, 2, 0)
    LearningCoefficient(lam=3/2, m=1)
    >>> reduced_rank(1, 1, 1, 0)  # K ≍ a²b²
    LearningCoefficient(lam=1/2, m=2)
    """
    M = as_int(M, "M", minimum=1)
    N = as_int(N, "N", minimum=1)
    H = as_int(H, "H", minimum=1)
    r = as_int(r, "r", minimum=0)
    if r > min(M, N, H):
        raise ValueError(f"r must satisfy 0 <= r <= min(M, N, H) = {min(M, N, H)}, got {r}")
    if M + H < N + r:
        return LearningCoefficient(Fraction(H * M - H * r + N * r, 2), 1)
    if N + H < M + r:
        return LearningCoefficient(Fraction(H * N - H * r + M * r, 2), 1)
    if M + N < H + r:
        return LearningCoefficient(Fraction(M * N, 2), 1)
    s = (M + H + N + r) % 2
    lam = Fraction(2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2 + s, 8)
    return LearningCoefficient(lam, 1 + s)
