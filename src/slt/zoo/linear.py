"""Linear networks with known learning coefficients: regular, reduced rank, deep linear.

Data: x ~ N(0, I), y = W x + ε with W = W_L ⋯ W_1 at w*, ε ~ N(0, σ²) projected off the
span of the inputs, so w* minimizes L_n exactly. w* is block identity of rank r in every
layer (THEORY.md: there the local coefficient equals the global one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slt import theory
from slt.losses import gaussian_nll
from slt.theory._validate import as_int
from slt.zoo.base import Case, Settings, data_arguments, orthogonal_noise


def _block_identity(rows: int, cols: int, rank: int) -> torch.Tensor:
    w = torch.zeros(rows, cols)
    w[range(rank), range(rank)] = 1.0
    return w


def linear_network(widths: Sequence[int], rank: int) -> torch.nn.Sequential:
    """Bias-free linear layers ``widths[0] -> ... -> widths[-1]``, each block identity of rank r."""
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        # skip_init: the default initialization would draw from the global RNG, to be
        # overwritten at once
        layer = torch.nn.utils.skip_init(torch.nn.Linear, fan_in, fan_out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(_block_identity(fan_out, fan_in, rank))
        layers.append(layer)
    return torch.nn.Sequential(*layers)


def _linear_data(model, n_in: int, n_out: int, n: int, sigma: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=generator)
    with torch.no_grad():
        y = model(x) + orthogonal_noise(x, n_out, sigma, generator)
    return torch.utils.data.TensorDataset(x, y)


def _case(name, family, widths, rank, lc, *, n, sigma, seed, settings, description):
    n, sigma, seed = data_arguments(n, sigma, seed)
    model = linear_network(widths, rank)
    data = _linear_data(model, widths[0], widths[-1], n, sigma, seed)
    return Case(
        name=name,
        family=family,
        model=model,
        dataset=data,
        loss_fn=gaussian_nll(sigma),
        lam=lc.lam,
        m=lc.m,
        settings=settings or Settings(),
        description=description,
    )


def regular(
    n_in: int, n_out: int = 1, *, n: int = 4096, sigma: float = 1.0, seed: int = 0, settings=None
) -> Case:
    """Linear regression y = W x + ε with a full-rank W: λ = d/2, m = 1."""
    n_in, n_out = as_int(n_in, "n_in", minimum=1), as_int(n_out, "n_out", minimum=1)
    widths = (n_in, n_out)
    rank = min(n_in, n_out)
    return _case(
        f"regular({n_in},{n_out})", "regular", widths, rank,
        theory.regular(n_in * n_out), n=n, sigma=sigma, seed=seed, settings=settings,
        description="linear regression, full-rank truth",
    )  # fmt: skip


def reduced_rank(
    M: int, N: int, H: int, r: int, *, n: int = 4096, sigma: float = 1.0, seed: int = 0,
    settings=None,
) -> Case:  # fmt: skip
    """y = B A x + ε, A: H×M, B: N×H, true rank r (Aoyagi & Watanabe 2005)."""
    return _case(
        f"rrr(M={M},N={N},H={H},r={r})", "reduced_rank", (M, H, N), r,
        theory.reduced_rank(M, N, H, r), n=n, sigma=sigma, seed=seed, settings=settings,
        description="reduced rank regression, block-identity w*",
    )  # fmt: skip


def deep_linear(
    widths: Sequence[int], r: int, *, n: int = 4096, sigma: float = 1.0, seed: int = 0,
    settings=None,
) -> Case:  # fmt: skip
    """y = W_L ⋯ W_1 x + ε, true product of rank r (Aoyagi 2024, Theorem 1)."""
    widths = tuple(widths)
    return _case(
        f"dln({'-'.join(map(str, widths))},r={r})", "deep_linear", widths, r,
        theory.deep_linear(widths, r), n=n, sigma=sigma, seed=seed, settings=settings,
        description=f"{len(widths) - 1}-layer linear network, block-identity w*",
    )  # fmt: skip
