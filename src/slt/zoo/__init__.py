"""Models whose learning coefficient is known, ready to estimate.

Each builder returns a :class:`Case`: the model at w*, a dataset, the ``loss_fn``, the
exact (λ, m) from :mod:`slt.theory`, and sampler settings known to work.

>>> from slt import zoo
>>> case = zoo.regular(4, 1, n=256)
>>> case.lam, case.m, case.num_params
(Fraction(2, 1), 1, 4)
"""

from slt.zoo.base import Case, Settings, orthogonal_noise
from slt.zoo.linear import deep_linear, linear_network, reduced_rank, regular
from slt.zoo.potentials import Monomial, exact_nll, expected_llc, potential
from slt.zoo.tanh import TanhNetwork, tanh_network

__all__ = [
    "Case",
    "Monomial",
    "Settings",
    "TanhNetwork",
    "deep_linear",
    "expected_llc",
    "linear_network",
    "orthogonal_noise",
    "potential",
    "exact_nll",
    "reduced_rank",
    "regular",
    "tanh_network",
]
