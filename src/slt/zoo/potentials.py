"""Monomial potentials y = (Π_j w_j^{k_j}) x + ε at w* = 0 (Lau et al. 2023, §5).

With the noise projected off x, L_n(w) - L_n(0) = c (Π_j w_j^{k_j})² exactly, where
c = mean(x²) / (2σ²): a normal crossing K with λ = min_j 1/(2k_j) and m the number of
j attaining it (Watanabe 2009). Its finite-nβ expectation is computed by quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from scipy import integrate

from slt import _checks, theory
from slt.losses import gaussian_nll
from slt.theory._validate import as_int
from slt.zoo.base import Case, Settings, data_arguments, orthogonal_noise


class Monomial(torch.nn.Module):
    """f(x) = (Π_j w_j^{k_j}) x with one scalar parameter per factor, at w = ``init``."""

    def __init__(self, k: Sequence[int], init: float = 0.0):
        super().__init__()
        self.k = exponents(k)
        self.w = torch.nn.Parameter(torch.full((len(self.k),), float(init)))
        # factors with k_j = 0 are 1 and left out: d(w^0)/dw = 0 · w^-1 is NaN at w = 0
        self._used = None if all(self.k) else [j for j, kj in enumerate(self.k) if kj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._used is None:
            return torch.prod(self.w ** torch.tensor(self.k, dtype=self.w.dtype)) * x
        k = torch.tensor([self.k[j] for j in self._used], dtype=self.w.dtype)
        return torch.prod(self.w[self._used] ** k) * x


def exponents(k: Sequence[int]) -> tuple[int, ...]:
    """``k`` as a tuple of ints >= 0, each checked by name (``int()`` truncated 1.5 to 1)."""
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence) or not k:
        raise ValueError(f"k must be a non-empty sequence of integers >= 0, got {k!r}")
    return tuple(as_int(kj, f"k[{j}]", minimum=0) for j, kj in enumerate(k))


def expected_llc(k: Sequence[int], scale: float, localization: float) -> float:
    """t·E[K] under exp(-t K(w) - (γ/2)‖w‖²) for K = Π_j w_j^{2k_j}, with t = ``scale``.

    One factor with k_j = 1 is integrated in closed form (a Gaussian in w_j: given the
    others, E[t K] = tP/(2tP + γ) with P the rest of the product); the remaining ones by
    adaptive quadrature. Requires γ > 0 and some k_j = 1.
    """
    if not localization > 0 or not math.isfinite(localization):
        raise ValueError(
            f"localization must be > 0 and finite for a proper local posterior, got "
            f"{localization!r}"
        )
    if not scale >= 0 or not math.isfinite(scale):
        raise ValueError(f"scale (c·nβ) must be >= 0 and finite, got {scale!r}")
    k = list(exponents(k))
    if 1 not in k:
        raise ValueError(f"expected_llc needs some exponent equal to 1, got k={tuple(k)}")
    k.remove(1)
    t, g = float(scale), float(localization)

    def weights(*w):
        p = t * math.prod(wj ** (2 * kj) for wj, kj in zip(w, k))
        base = math.exp(-0.5 * g * sum(wj * wj for wj in w)) / math.sqrt(2 * p + g)
        return base, p / (2 * p + g)

    if not k:
        return t / (2 * t + g) if t else 0.0
    bounds = [(0.0, math.inf)] * len(k)
    opts = {"limit": 200, "epsabs": 0.0, "epsrel": 1e-10}
    num = integrate.nquad(lambda *w: math.prod(weights(*w)), bounds, opts=opts)[0]
    den = integrate.nquad(lambda *w: weights(*w)[0], bounds, opts=opts)[0]
    return num / den


def potential(
    k: Sequence[int], *, n: int = 4096, sigma: float = 0.5, seed: int = 0, settings=None
) -> Case:
    """The case y = (Π_j w_j^{k_j}) x + N(0, σ²) at w* = 0, x ~ N(0, 1)."""
    k = exponents(k)
    n, sigma, seed = data_arguments(n, sigma, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator)
    y = orthogonal_noise(x, 1, sigma, generator)
    c = float((x.square().mean() / (2 * sigma * sigma)).item())
    lc = theory.monomial(k)
    name = "·".join(f"w{j}^{2 * kj}" for j, kj in enumerate(k))
    return Case(
        name=f"potential({name})",
        family="potential",
        model=Monomial(k),
        dataset=torch.utils.data.TensorDataset(x, y),
        loss_fn=gaussian_nll(sigma),
        lam=lc.lam,
        m=lc.m,
        settings=settings or Settings(),
        expected=(
            (lambda nbeta, loc: expected_llc(k, c * _checks.real("nbeta", nbeta, minimum=0), loc))
            if 1 in k
            else None
        ),
        description=f"K ∝ {name}",
    )


def exact_nll(case: Case) -> tuple[float, float, Callable[[torch.Tensor], torch.Tensor]]:
    """The exact L_n of a :func:`potential` case as (L_n(0), c, nll).

    With the noise projected off x, L_n(w) = L_n(0) + c (Π_j w_j^{k_j})² exactly, where
    c = mean(x²)/(2σ²); ``nll`` maps a batch of points w (m, d) to their L_n (m,) in
    float64 — the integrand of the quadrature references.
    """
    x, y = case.dataset.tensors
    sigma = case.loss_fn.sigma
    c = float(x.double().square().mean() / (2 * sigma**2))
    with torch.no_grad():
        l0 = float(case.loss_fn(case.model, (x, y)))
    power = torch.tensor(case.model.k, dtype=torch.float64)

    def nll(w: torch.Tensor) -> torch.Tensor:
        return l0 + c * torch.prod(w**power, dim=1) ** 2

    return l0, c, nll
