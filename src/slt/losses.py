"""Adapters that turn common criteria into ``loss_fn(model, batch) -> Tensor``.

Every estimator in slt takes the *mean per-sample negative log-likelihood* of a batch.
A loss that is c times the NLL behaves like the temperature c·nβ, so a plain
``F.mse_loss`` is not an NLL: use :func:`gaussian_nll` for regression.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def supervised(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> LossFn:
    """``loss_fn`` for ``(x, y)`` batches: ``criterion(model(x), y)``.

    ``criterion`` must return the batch mean of a per-sample NLL, e.g.
    ``torch.nn.functional.cross_entropy``.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> loss_fn = supervised(F.cross_entropy)
    >>> model = torch.nn.Linear(3, 2)
    >>> batch = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    >>> loss_fn(model, batch).item() > 0
    True
    """

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return criterion(model(x), y)

    loss_fn.__qualname__ = f"supervised({getattr(criterion, '__name__', repr(criterion))})"
    return loss_fn


def gaussian_nll(sigma: float = 1.0) -> LossFn:
    """``loss_fn`` for regression with Gaussian noise of standard deviation ``sigma``.

    Per sample, -log N(y | f(x), σ² I) = ‖y - f(x)‖² / (2σ²) + k log σ + (k/2) log 2π,
    for k output dimensions; the result is the batch mean.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = torch.nn.init.zeros_(model.weight)
    >>> batch = (torch.ones(2, 1), torch.ones(2, 1))
    >>> round(gaussian_nll(1.0)(model, batch).item(), 4)  # 1/2 + log(2π)/2
    1.4189
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"gaussian_nll: sigma must be a positive finite number, got {sigma!r}")
    inv_two_var = 1.0 / (2.0 * sigma * sigma)
    const = math.log(sigma) + 0.5 * math.log(2 * math.pi)

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        residual = (model(x) - y).reshape(y.shape[0], -1)
        return (residual.square().sum(1) * inv_two_var).mean() + residual.shape[1] * const

    loss_fn.__qualname__ = f"gaussian_nll(sigma={sigma})"
    return loss_fn
