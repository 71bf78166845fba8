"""What a zoo case is, and the data construction that makes its answer exact at finite n."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from slt import _checks
from slt.losses import LossFn


@dataclass(frozen=True)
class Settings:
    """Sampler settings known to work for a case (used by ``slt validate``)."""

    step_size: float = 5e-5
    localization: float = 1.0
    batch_size: int = 128
    num_chains: int = 4
    num_draws: int = 1500
    num_burnin: int = 500
    sampler: str = "sgld"
    control_variate: str = "gradient"

    def estimate_kwargs(self) -> dict:
        """Keyword arguments for :func:`slt.estimate_llc` (all but the batch size)."""
        return {k: v for k, v in vars(self).items() if k != "batch_size"}


@dataclass(frozen=True)
class Case:
    """A model at w*, its data and loss, and the known learning coefficient (λ, m) there.

    ``expected(nbeta, localization)``, where given, is the exact finite-nβ value that
    λ̂ estimates (for m > 1 it differs from λ by about (m - 1)/log nβ; THEORY.md).
    """

    name: str
    family: str
    model: torch.nn.Module
    dataset: torch.utils.data.TensorDataset
    loss_fn: LossFn
    lam: Fraction
    m: int
    settings: Settings = field(default_factory=Settings)
    expected: Callable[[float, float], float] | None = None
    description: str = ""

    @property
    def n(self) -> int:
        return len(self.dataset)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loader(self, batch_size: int | None = None) -> torch.utils.data.DataLoader:
        """A shuffling ``DataLoader`` over the case's data."""
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size or self.settings.batch_size, shuffle=True
        )


def orthogonal_noise(x: torch.Tensor, k: int, sigma: float, generator) -> torch.Tensor:
    """Gaussian noise (n, k) with its projection on the column span of ``x`` removed.

    Then Σ_i x_i εᵢᵀ = 0, so for any linear-in-x truth the least-squares fit of the data
    is exactly the truth: the true parameter is an exact minimizer of L_n.
    """
    noise = sigma * torch.randn(x.shape[0], k, generator=generator, dtype=x.dtype)
    q, _ = torch.linalg.qr(x)
    return noise - q @ (q.T @ noise)


def data_arguments(n, sigma, seed) -> tuple[int, float, int]:
    """The builders' ``n`` (>= 2), ``sigma`` (> 0) and ``seed``, checked by name."""
    return (
        _checks.integer("n", n, minimum=2),
        _checks.real("sigma", sigma, minimum=0, strict=True),
        _checks.seed(seed),
    )
