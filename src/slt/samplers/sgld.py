"""Stochastic gradient Langevin dynamics on the localized tempered posterior.

The target is p(w) ∝ exp(-nβ L_n(w) - (γ/2) ‖w - w*‖²) and one step is

    Δw = (ε/2) (-nβ ∇L_B(w) - γ (w - w*)) + N(0, ε I)

(Welling & Teh 2011; localized form from Lau et al. 2023, arXiv 2308.12108, eq. 9).
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
    order_center,
    unaliased,
)


class SGLDState(NamedTuple):
    params: Params


def sgld(*, step_size: float, nbeta: float, localization: float, center: Params) -> Kernel:
    """Build an SGLD kernel with step size ε = ``step_size`` around ``center`` = w*.

    Examples
    --------
    >>> import torch
    >>> w = {"w": torch.zeros(3)}
    >>> kernel = sgld(step_size=1e-2, nbeta=10.0, localization=1.0, center={"w": torch.zeros(3)})
    >>> state = kernel.init({"w": w["w"].clone()})
    >>> grad_fn = lambda p, batch: ([2 * p["w"]], (p["w"] ** 2).sum())
    >>> state, info = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(0))
    >>> state.params["w"].shape
    torch.Size([3])
    """
    # anchor: w* in the order of the parameters, filled by init
    step_size, nbeta, localization, center, anchor = kernel_arguments(
        step_size, nbeta, localization, center
    )
    noise_scale = math.sqrt(step_size)
    pull = step_size * localization / 2

    noise_like = NoiseBuffer()  # the step's noise, drawn into one reused buffer

    def init(params: Params) -> SGLDState:
        order_center(params, center, anchor)
        return SGLDState(params)

    def step(
        state: SGLDState, grad_fn: GradFn, batch, generator: torch.Generator
    ) -> tuple[SGLDState, StepInfo]:
        check_generator(generator)
        grads, loss = grad_fn(state.params, batch)
        w = list(state.params.values())
        grads = unaliased(grads, w)
        with torch.no_grad():
            # w + (ε/2)(-γ (w - w*)) is lerp(w, w*, εγ/2): three passes over the parameters
            # where the drift written out takes five (they dominate the step of a large model)
            if pull != 0.0:
                torch._foreach_lerp_(w, anchor, pull)
            torch._foreach_add_(w, grads, alpha=-nbeta * step_size / 2)
            torch._foreach_add_(w, noise_like(w, generator), alpha=noise_scale)
        return state, StepInfo(loss)

    return Kernel(init, step)
