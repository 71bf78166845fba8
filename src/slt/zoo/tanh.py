"""One-hidden-layer tanh networks, 1-d in and out, no biases, true function 0.

f(x) = Σ_h a_h tanh(b_h x) at w* = 0; λ = (H + i² + i)/(4i + 2), i = ⌊√H⌋ (Aoyagi 2006;
Watanabe 2009). The noise is projected off x, the leading term of every tanh(b x), so w*
is a minimizer of L_n up to terms of order b³.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from slt import theory
from slt.losses import gaussian_nll
from slt.theory._validate import as_int
from slt.zoo.base import Case, Settings, data_arguments, orthogonal_noise


class TanhNetwork(torch.nn.Module):
    """f(x) = Σ_h a_h tanh(b_h x), parameters a, b ∈ R^H, all zero at w*."""

    def __init__(self, hidden: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(hidden))
        self.b = torch.nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.b) @ self.a.unsqueeze(1)


def expected_llc(
    x: np.ndarray,
    y: np.ndarray,
    sigma: float,
    nbeta: float,
    localization: float,
    *,
    hidden: int,
    grid: int = 0,
) -> float:
    """Exact finite-n value of nβ E[L_n(w) - L_n(0)] for the tanh network with data (x, y).

    Given b, K_n = aᵀA a - Bᵀa is quadratic in a, with A = TᵀT/(2σ²n), B = Tᵀy/(σ²n) and
    T_ih = tanh(b_h x_i); the Gaussian integral over a is done in closed form and the one
    over b ∈ R^H (H ≤ 3) by the trapezoid rule in u, b = s sinh(u), with s the width of the
    weight's peak at b = 0 (a uniform grid in b missed it: 4.5% low for H = 3 at the zoo's
    defaults, 32% for H = 1 at nβ = 4096, γ = 0.1). Checked against a grid of 2/3 the
    points: where they differ by more than ``GRID_RTOL`` a ValueError says so (for H ≥ 2
    at large nβ, where the weight moves off w* = 0, a minimizer of L_n only up to O(b³)).
    Needs γ > 0 and nβ ≥ 0.
    """
    hidden = as_int(hidden, "hidden", minimum=1)
    if hidden > 3:
        raise ValueError(
            f"hidden must be 1, 2 or 3 (the quadrature is over R^hidden), got {hidden}"
        )
    t, g = float(nbeta), float(localization)
    if not g > 0 or not math.isfinite(g):
        raise ValueError(f"localization must be > 0 and finite, got {localization!r}")
    if not t >= 0 or not math.isfinite(t):
        raise ValueError(f"nbeta must be >= 0 and finite, got {nbeta!r}")
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    grid = grid or {1: 2001, 2: 301, 3: 81}[hidden]
    value = _on_grid(x, y, sigma, t, g, hidden=hidden, grid=grid)
    coarse = _on_grid(x, y, sigma, t, g, hidden=hidden, grid=2 * grid // 3 + 1)
    if not math.isclose(value, coarse, rel_tol=GRID_RTOL, abs_tol=GRID_RTOL):
        raise ValueError(
            f"the quadrature over b did not converge at nbeta={nbeta:g}, "
            f"localization={localization:g}: {value:.6g} on {grid} points per b_h, "
            f"{coarse:.6g} on {2 * grid // 3 + 1}; the weight is off w* = 0 here (a minimizer "
            "of L_n only up to O(b³)): use a smaller nbeta or a larger localization"
        )
    return value


GRID_RTOL = 1e-3
"""Relative (and absolute) agreement asked of :func:`expected_llc` on two grids."""


def _on_grid(x, y, sigma: float, t: float, g: float, *, hidden: int, grid: int) -> float:
    """nβ E[L_n(w) - L_n(0)] at nβ = t, γ = g on a grid of ``grid`` points per b_h (float64
    arrays x, y; see expected_llc)."""
    n = x.size
    # b = s sinh(u) on a uniform grid in u: fine near b = 0, where the weight changes on the
    # scale s (from the log det of P: 2 nβ c b² against γ), coarse out to 8/√γ
    reach = 8 / math.sqrt(g)
    c = float(np.mean(x * x)) / (2 * sigma**2)
    s = min(math.sqrt(g / (2 * t * c)), reach) if t * c > 0 else reach
    u = np.linspace(-math.asinh(reach / s), math.asinh(reach / s), grid)
    b = s * np.sinh(u)
    log_jacobian = np.log(np.cosh(u))  # db = s cosh(u) du
    tb = np.tanh(np.outer(b, x))  # (grid, n)
    gram = tb @ tb.T / (2 * sigma**2 * n)  # (grid, grid)
    lin = tb @ y / (sigma**2 * n)  # (grid,)
    idx = np.stack(np.meshgrid(*[np.arange(grid)] * hidden, indexing="ij"), -1).reshape(-1, hidden)
    A = gram[idx[:, :, None], idx[:, None, :]]  # (points, H, H)
    B = lin[idx]  # (points, H)
    P = 2 * t * A + g * np.eye(hidden)
    cov = np.linalg.inv(P)
    mu = np.einsum("pij,pj->pi", cov, t * B)
    tk = t * (np.einsum("pij,pji->p", A, cov) + np.einsum("pi,pij,pj->p", mu, A, mu)
              - np.einsum("pi,pi->p", B, mu))  # fmt: skip
    _, logdet = np.linalg.slogdet(P)
    logw = (-0.5 * logdet + 0.5 * np.einsum("pi,pi->p", t * B, mu)
            - 0.5 * g * (b[idx] ** 2).sum(1) + log_jacobian[idx].sum(1))  # fmt: skip
    w = np.exp(logw - logw.max())
    return float((w * tk).sum() / w.sum())


def tanh_network(
    hidden: int, *, n: int = 4096, sigma: float = 0.5, seed: int = 0, settings=None
) -> Case:
    """The case y = Σ_h a_h tanh(b_h x) + N(0, σ²) with truth 0, x ~ N(0, 1)."""
    hidden = as_int(hidden, "hidden", minimum=1)
    n, sigma, seed = data_arguments(n, sigma, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator)
    y = orthogonal_noise(x, 1, sigma, generator)
    lc = theory.tanh_1d(hidden)
    return Case(
        name=f"tanh(H={hidden})",
        family="tanh",
        model=TanhNetwork(hidden),
        dataset=torch.utils.data.TensorDataset(x, y),
        loss_fn=gaussian_nll(sigma),
        lam=lc.lam,
        m=lc.m,
        settings=settings or Settings(),
        expected=(
            (lambda nbeta, loc: expected_llc(x, y, sigma, nbeta, loc, hidden=hidden))
            if hidden <= 3
            else None
        ),
        description="1-d tanh network, truth 0",
    )
