"""Metropolis-adjusted Langevin (MALA) on the localized tempered posterior.

The target is log p(w) = -nβ L(w) - (γ/2) ‖w - w*‖² + const, with L the loss on the batch
the kernel is given, which must be the *same* batch at every step (the whole dataset:
:func:`slt.estimate_llc` arranges it). With g(w) = ∇log p(w) one step proposes

    w' = w + (ε/2) g(w) + √ε ξ,    ξ ~ N(0, I),

i.e. q(w'|w) = N(w'; w + (ε/2) g(w), ε I), the SGLD move, and accepts it with probability

    α = min(1, p(w') q(w|w') / (p(w) q(w'|w)))

(Rossky, Doll & Friedman 1978; Besag 1994; analysed and named by Roberts & Tweedie 1996,
"Exponential convergence of Langevin distributions and their discrete approximations",
Bernoulli 2(4)). The chain then has p as its exact stationary law for any ε: the step
size only changes how fast it mixes.
With Δ = w' - w the proposal ratio is, exactly and without the 1/ε cancellation of the
two Gaussian exponents,

    log q(w|w') - log q(w'|w) = -½ Δ·(g(w) + g(w')) - (ε/8) (‖g(w')‖² - ‖g(w)‖²),

which is what :func:`log_acceptance_ratio` computes. The same function gives the MALA
acceptance of an SGLD move (Furman & Lau 2024, arXiv 2402.03698), used as a step-size
diagnostic by :func:`slt.estimate_llc`.
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


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Σ x·y over a list of tensors, accumulated in float64 (a 0-d tensor)."""
    sums = [torch.sum(x * y, dtype=torch.float64) for x, y in zip(xs, ys)]
    return sums[0] if len(sums) == 1 else torch.stack(sums).sum()  # one: the same number


def log_density(
    params: list[torch.Tensor],
    loss: torch.Tensor,
    center: list[torch.Tensor],
    *,
    nbeta: float,
    localization: float,
) -> torch.Tensor:
    """log p(w) = -nβ L(w) - (γ/2) ‖w - w*‖² as a float64 0-d tensor, given L(w) = ``loss``."""
    value = -nbeta * loss.to(torch.float64)
    if localization != 0.0:
        offset = torch._foreach_sub(params, center)
        value = value - 0.5 * localization * _dot(offset, offset)
    return value


def log_acceptance_ratio(
    delta: list[torch.Tensor],
    drift: list[torch.Tensor],
    drift_new: list[torch.Tensor],
    log_p: torch.Tensor,
    log_p_new: torch.Tensor,
    *,
    step_size: float,
    squares: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """log [p(w') q(w|w') / (p(w) q(w'|w))] for the Langevin proposal N(w + (ε/2) g(w), ε I).

    Parameters
    ----------
    delta : list of tensors
        Δ = w' - w.
    drift, drift_new : list of tensors
        g(w) and g(w'), the gradients of log p.
    log_p, log_p_new : 0-d tensors
        log p(w) and log p(w') (any common constant cancels).
    step_size : float
        ε.
    squares : (‖g‖², ‖g'‖²), optional
        The squared norms, if known (the MALA kernel keeps ‖g‖² from the step before).

    Returns
    -------
    0-d float64 tensor: log p(w') - log p(w) - ½ Δ·(g + g') - (ε/8)(‖g'‖² - ‖g‖²).

    Examples
    --------
    A flat target accepts every proposal (the proposal is symmetric):

    >>> import torch
    >>> zero = [torch.zeros(2)]
    >>> float(log_acceptance_ratio([torch.ones(2)], zero, zero, torch.tensor(0.0),
    ...                            torch.tensor(0.0), step_size=0.1))
    0.0
    """
    total = torch._foreach_add(drift, drift_new)
    square, square_new = squares or (_dot(drift, drift), _dot(drift_new, drift_new))
    proposal = -0.5 * _dot(delta, total) - (step_size / 8) * (square_new - square)
    return (log_p_new.to(torch.float64) - log_p.to(torch.float64)) + proposal


def move_log_ratio(
    start: list[torch.Tensor],
    params: list[torch.Tensor],
    grad: list[torch.Tensor],
    grad_new: list[torch.Tensor],
    loss: torch.Tensor,
    loss_new: torch.Tensor,
    center: list[torch.Tensor],
    *,
    nbeta: float,
    localization: float,
    step_size: float,
    chains: bool = False,
) -> torch.Tensor:
    """MALA's log r for the move ``start`` → ``params`` (an SGLD step's, for its acceptance
    as a step-size check), given the plain loss gradients ∇L at both ends, which are
    **overwritten** (with the drifts g = −nβ ∇L − γ (w − w*)):

        log r = −nβ (L' − L) − (γ/2) Δ·(w + w' − 2w*) − ½ Δ·(g + g') − (ε/8) (g' − g)·(g' + g),

    the same value as :func:`log_acceptance_ratio` with :func:`log_density`, with the
    differences of squared norms written as products of a difference and a sum (no
    cancellation between two large norms). It works through the parameters in pieces of
    :data:`MOVE_PIECE` numbers (consecutive tensors that fit in one piece together go as one
    piece: 1.36 -> 1.11 ms a probe on a 10k-parameter MLP's 6 tensors at 4 chains) with
    temporaries of a piece's size, where the list form
    needs several copies of the whole parameter set (on a 1M-parameter MLP, whole tensors at
    a time already cut the probe's peak memory by ~20 MB; pieces cut ~9 MB more). Sums are
    accumulated in float64. With ``chains=True`` the tensors carry a leading chain dimension
    (``center``'s may be 1, broadcast) and the result is (chain,); otherwise it is 0-d.
    """

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if chains else t.reshape(-1)

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(-1, dtype=torch.float64)

    value = -nbeta * (loss_new.to(torch.float64) - loss.to(torch.float64))
    grad = localized_drift(start, grad, center, nbeta=nbeta, localization=localization)
    grad_new = localized_drift(params, grad_new, center, nbeta=nbeta, localization=localization)
    rows = start[0].shape[0] if chains else 1
    piece = max(1, MOVE_PIECE // rows)
    for group in _runs([t.numel() // rows for t in start], piece):
        # consecutive tensors that fit in one piece together go as one: a small model's
        # dozen small tensors cost a dozen times the operations otherwise
        tensors = [
            flat(ts[group[0]]) if len(group) == 1 else torch.cat([flat(ts[i]) for i in group], -1)
            for ts in (start, params, grad, grad_new, center)
        ]
        size = tensors[0].shape[-1]
        for first in range(0, size, piece):
            w, w1, g, g1, c = (t[..., first : first + piece] for t in tensors)
            delta = torch.sub(w1, w)
            if localization != 0.0:
                both = torch.add(w, w1).sub_(c, alpha=2.0)
                value = value - 0.5 * localization * total(both.mul_(delta))
            both = torch.add(g, g1)
            value = value - 0.5 * total(delta.mul_(both))
            value = value - step_size / 8 * total(torch.sub(g1, g, out=delta).mul_(both))
    return value


MOVE_PIECE = 1 << 16  # numbers per piece in move_log_ratio: 256 kB of float32


def _runs(sizes: list[int], piece: int) -> list[list[int]]:
    """Indices of ``sizes`` in runs of consecutive entries whose sum is at most ``piece``
    (an entry larger than ``piece`` alone)."""
    runs: list[list[int]] = []
    total = piece + 1
    for i, size in enumerate(sizes):
        if total + size > piece:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += size
    return runs


def acceptance_probability(log_ratio: torch.Tensor) -> torch.Tensor:
    """min(1, exp(log_ratio)), with NaN (a non-finite proposal) read as 0."""
    prob = torch.exp(torch.clamp(log_ratio, max=0.0))
    return torch.nan_to_num(prob, nan=0.0)


def _read_on_host(accept: torch.Tensor) -> bool:
    """Whether the step may read its accept decision on the host and branch (on the CPU,
    where that read costs nothing) rather than select with ``torch.where``, which keeps a
    GPU step free of synchronisation. Both give the same numbers (tested)."""
    return accept.device.type == "cpu"


class MALAState(NamedTuple):
    """``params`` (updated in place), a copy of them from before the last proposal, and the
    target at ``params``: its gradient g = ∇log p, ‖g‖², log p and the loss L (``None``
    until the first step, which evaluates them)."""

    params: Params
    previous: list[torch.Tensor]
    drift: list[torch.Tensor] | None = None
    log_density: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    square: torch.Tensor | None = None


def mala(*, step_size: float, nbeta: float, localization: float, center: Params) -> Kernel:
    """Build a MALA kernel with step size ε = ``step_size`` around ``center`` = w*.

    Each step makes one ``grad_fn`` call, at the proposal; the first step makes a second
    one to evaluate the starting point. The uniform of the accept test is drawn from
    ``generator`` right after the proposal noise. On rejection the parameters are restored
    bit for bit from the copy kept in the state. The info reports ``acceptance`` = α and
    ``accepted``. The batch must be the same at every step: the cached log p(w) was
    computed on the previous step's batch.

    Examples
    --------
    >>> import torch
    >>> kernel = mala(step_size=0.1, nbeta=10.0, localization=1.0, center={"w": torch.zeros(2)})
    >>> state = kernel.init({"w": torch.zeros(2)})
    >>> grad_fn = lambda p, batch: ([2 * p["w"]], (p["w"] ** 2).sum().detach())
    >>> state, info = kernel.step(state, grad_fn, None, torch.Generator().manual_seed(0))
    >>> 0.0 <= float(info.acceptance) <= 1.0
    True
    """
    # anchor: w* in the order of the parameters, filled by init
    step_size, nbeta, localization, center, anchor = kernel_arguments(
        step_size, nbeta, localization, center
    )
    noise_scale = math.sqrt(step_size)
    density = dict(center=anchor, nbeta=nbeta, localization=localization)

    noise_like = NoiseBuffer()  # the step's noise, drawn into one reused buffer

    def init(params: Params) -> MALAState:
        order_center(params, center, anchor)
        return MALAState(params, [torch.empty_like(p) for p in params.values()])

    def step(
        state: MALAState, grad_fn: GradFn, batch, generator: torch.Generator
    ) -> tuple[MALAState, StepInfo]:
        check_generator(generator)
        w = list(state.params.values())
        if state.loss is None:
            grads, loss = grad_fn(state.params, batch)
            with torch.no_grad():
                drift = localized_drift(
                    w, grads, anchor, nbeta=nbeta, localization=localization, fresh=True
                )  # kept: grad_fn may reuse its buffers
                loss = loss.detach().clone()  # kept too
                state = state._replace(drift=drift, log_density=log_density(w, loss, **density),
                                       loss=loss, square=_dot(drift, drift))  # fmt: skip
        previous = state.previous
        with torch.no_grad():
            torch._foreach_copy_(previous, w)
            noise = noise_like(w, generator)
            uniform = torch.rand((), generator=generator, device=w[0].device, dtype=torch.float64)
            torch._foreach_add_(w, state.drift, alpha=step_size / 2)
            torch._foreach_add_(w, noise, alpha=noise_scale)
        grads, loss = grad_fn(state.params, batch)
        with torch.no_grad():
            drift = localized_drift(
                w, grads, anchor, nbeta=nbeta, localization=localization, fresh=True
            )
            loss = loss.detach().clone()
            log_p = log_density(w, loss, **density)
            square = _dot(drift, drift)
            log_ratio = log_acceptance_ratio(
                torch._foreach_sub(w, previous),
                state.drift,
                drift,
                state.log_density,
                log_p,
                step_size=step_size,
                squares=(state.square, square),
            )
            prob = acceptance_probability(log_ratio)
            accept = uniform < prob
            before = state.drift, state.log_density, state.loss, state.square
            if _read_on_host(accept):  # a branch: the wheres' numbers, ~4 µs a tensor fewer
                if not bool(accept):
                    torch._foreach_copy_(w, previous)
                    drift, log_p, loss, square = before
            else:
                for p, old in zip(w, previous):
                    p.copy_(torch.where(accept, p, old))
                drift = [torch.where(accept, g, g0) for g, g0 in zip(drift, state.drift)]
                log_p, loss, square = (torch.where(accept, new, old) for new, old in
                                       zip((log_p, loss, square), before[1:]))  # fmt: skip
            new = state._replace(drift=drift, log_density=log_p, loss=loss, square=square)
        return new, StepInfo(state.loss, acceptance=prob, accepted=accept)

    return Kernel(init, step)
