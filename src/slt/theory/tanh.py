"""One-hidden-layer tanh network, one input and one output, no biases, true function 0.

f(x; a, b) = Σ_{h=1}^H a_h tanh(b_h x). Closed form of Aoyagi & Watanabe,
"Resolution of singularities and the generalization error with Bayesian estimation for
layered neural network", IEICE Transactions J88-D-II (2005, in Japanese), quoted in
Watanabe (2009), Algebraic Geometry and Statistical Learning Theory.
"""

from __future__ import annotations

import math
from fractions import Fraction

from slt.theory._validate import as_int
from slt.theory.coefficient import LearningCoefficient


def tanh_1d(H: int) -> LearningCoefficient:
    """Learning coefficient of f(x) = Σ_{h=1}^H a_h tanh(b_h x) at the truth f ≡ 0.

    λ = (H + i² + i) / (4i + 2),  i = ⌊√H⌋,
    m = 2 if H = i² (H a perfect square), m = 1 otherwise.

    λ is due to Aoyagi & Watanabe (IEICE Trans. J88-D-II, 2005), quoted in Watanabe
    (2009); THEORY.md cites it as (Aoyagi 2006; Watanabe 2009) and gives no multiplicity.
    The rule for m is the one paired with this λ in public research code of the singular
    learning theory community (github.com/suswei/BNN_via_SLT, ``dataset_factory.py``,
    dataset ``tanh``, citing Aoyagi & Watanabe). It was not checked against the primary
    paper, which was not available. It agrees with two facts tested in this package:
    H = 1 is K ≍ a²b², which has m = 2; and λ = min over j ≥ 0 of (H + j² + j)/(4j + 2),
    whose minimiser is unique except at H = i², where j = i − 1 and j = i tie.

    Parameters
    ----------
    H : int
        Number of hidden units, H ≥ 1.

    Examples
    --------
    >>> tanh_1d(1)
    LearningCoefficient(lam=1/2, m=2)
    >>> tanh_1d(2)
    LearningCoefficient(lam=2/3, m=1)
    """
    H = as_int(H, "H", minimum=1)
    i = math.isqrt(H)
    return LearningCoefficient(Fraction(H + i * i + i, 4 * i + 2), 2 if i * i == H else 1)
