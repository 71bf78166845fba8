"""Stochastic gradient Nosé-Hoover thermostat (SGNHT) on the localized tempered posterior.

The potential is U(w) = nβ L_B(w) + (γ/2) ‖w - w*‖². Ding, Fang, Babbush, Chen, Skeel &
Neven 2014 ("Bayesian sampling using stochastic gradient thermostats", NeurIPS 27,
Algorithm 1) add a momentum p and a scalar thermostat ξ; with time step h, diffusion A
and d parameters one step is

    p ← p - ξ p h - ∇U(w) h + √(2A) N(0, h I)
    w ← w + p h
    ξ ← ξ + (pᵀp / d - 1) h.

The thermostat raises the friction ξ when the kinetic energy pᵀp/d is above its target 1
and lowers it when below, so it absorbs the unknown variance of the minibatch gradient
noise. We use the reparametrization of Chen, Fox & Guestrin 2014 (SGHMC, "connection to
SGD with momentum"), as devinterp does: v = p h, η = h², α = ξ h, a = A h. One step is then

    v ← (1 - α) v - η ∇U(w) + √(2 a η) N(0, I)
    w ← w + v
    α ← α + vᵀv / d - η,

with η = ``step_size`` (the same scale as SGLD's ε: both are stable for η < 4/curvature)
and a = ``diffusion``, the per-step friction the thermostat starts at (A = a/√η).
We start from v = 0 and α = a (Ding et al. draw p ~ N(0, I); a zero start is
deterministic). From it the thermostat oscillates with a period of ~2π/√(2η) steps (444
at η = 1e-4) and settles over two or three periods, not ~1/(2a) steps: on the exact
quadratic of zoo.regular(4) λ̂ overshot 35% at steps 200-300 and settled by ~1,000, so a
burn-in of 250 read +3.3%. :func:`slt.estimate_llc` warns below 2.5 periods
(:func:`slt.sampling.sgnht_burnin`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from slt.samplers.base import (
    GradFn,
    Kernel,
    NoiseBuffer,
    Params,
    StepInfo,
    check_generator,
    kernel_arguments,
    localized_drift,
    order_center,
)


class SGNHTState(NamedTuple):
    params: Params
    momentum: list[torch.Tensor]  # v = p h, like params
    thermostat: torch.Tensor  # 0-d float64, α = ξ h


def sgnht(
    *,
    step_size: float,
    nbeta: float,
    localization: float,
    center: Params,
    diffusion: float = 0.01,
) -> Kernel:
    """Build an SGNHT kernel with step size η = ``step_size`` around ``center`` = w*.

    Parameters
    ----------
    step_size : float
        η = h², the learning rate of the momentum form.
    nbeta, localization : float
        nβ and γ of the target.
    center : dict of tensors
        w*.
    diffusion : float
        a = A h, the injected noise is N(0, 2aη) per step and the thermostat starts at
        α = a. Default 0.01, devinterp's ``diffusion_factor``: a relaxation time of about
        1/a = 100 steps for the momentum.

    Examples
    --------
    >>> import torch
    >>> kernel = sgnht(step_size=1e-3, nbeta=10.0, localization=1.0,
    ...                center={"w": torch.zeros(2)}, diffusion=0.0)
    >>> state = kernel.init({"w": torch.zeros(2)})
    >>> grad_fn = lambda p, batch: ([torch.zeros(2)], torch.tensor(0.0))
    >>> state, _ = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(0))
    >>> float(state.thermostat)  # no kinetic energy: α falls by η
    -0.001
    """
    # anchor: w* in the order of the parameters, filled by init
    step_size, nbeta, localization, center, anchor = kernel_arguments(
        step_size, nbeta, localization, center
    )
    noise_scale = math.sqrt(2 * diffusion * step_size)

    noise_like = NoiseBuffer()  # the step's noise, drawn into one reused buffer

    def init(params: Params) -> SGNHTState:
        order_center(params, center, anchor)
        momentum = [torch.zeros_like(p) for p in params.values()]
        device = momentum[0].device
        return SGNHTState(
            params, momentum, torch.tensor(diffusion, dtype=torch.float64, device=device)
        )

    def step(
        state: SGNHTState, grad_fn: GradFn, batch, generator: torch.Generator
    ) -> tuple[SGNHTState, StepInfo]:
        check_generator(generator)
        grads, loss = grad_fn(state.params, batch)
        w = list(state.params.values())
        v = state.momentum
        with torch.no_grad():
            drift = localized_drift(w, grads, anchor, nbeta=nbeta, localization=localization)
            noise = noise_like(w, generator)
            torch._foreach_mul_(v, (1 - state.thermostat).to(v[0].dtype))
            torch._foreach_add_(v, drift, alpha=step_size)
            if noise_scale:
                torch._foreach_add_(v, noise, alpha=noise_scale)
            torch._foreach_add_(w, v)
            kinetic = torch.stack([torch.sum(x * x, dtype=torch.float64) for x in v]).sum()
            state.thermostat.add_(kinetic / sum(x.numel() for x in v) - step_size)
        return state, StepInfo(loss)

    return Kernel(init, step)
