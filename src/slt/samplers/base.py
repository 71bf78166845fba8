"""The kernel interface every sampler implements.

A kernel is a pair of functions over a dict of tensors, in the manner of BlackJAX:

- ``init(params) -> state``
- ``step(state, grad_fn, batch, generator) -> (state, info)``

``grad_fn(params, batch) -> (grads, loss)`` returns the gradient of the minibatch mean
loss L_B at ``params`` (a list of tensors in the order of ``params``) and the loss itself.
Kernels never touch an ``nn.Module``, a file or the global random generator: all
randomness comes from ``generator``.

The state is *donated* to ``step``: its tensors are updated in place (as JAX's donated
buffers), so the caller that wants to keep the old state clones it first. This keeps the
hot path free of allocations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

Params = dict[str, torch.Tensor]
GradFn = Callable[[Params, Any], tuple[list[torch.Tensor], torch.Tensor]]


class StepInfo(NamedTuple):
    """What one step reports (0-d tensors).

    ``loss`` is L_B at the state *before* the step. Metropolis-adjusted kernels (MALA) also
    report ``acceptance``, the probability min(1, r) of accepting this step's proposal, and
    ``accepted``, whether it was; the others leave them ``None``.
    """

    loss: torch.Tensor
    acceptance: torch.Tensor | None = None
    accepted: torch.Tensor | None = None


class Kernel(NamedTuple):
    """A sampler: ``init(params) -> state`` and ``step(state, grad_fn, batch, generator)``."""

    init: Callable[[Params], Any]
    step: Callable[[Any, GradFn, Any, torch.Generator], tuple[Any, StepInfo]]


class _NoiseLayout:
    """One flat noise buffer and its views shaped like ``params`` (with ``rows``, a
    (rows, d) buffer for chain-stacked parameters), made again only when the parameters'
    shapes, dtype or device change."""

    def __init__(self):
        self._key = None
        self.flat: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def fit(self, params: list[torch.Tensor], rows: int = 0) -> _NoiseLayout:
        first = params[0]
        key = (tuple(p.shape for p in params), first.dtype, first.device, rows)
        if key != self._key:
            sizes = [(p[0] if rows else p).numel() for p in params]
            shape = (rows, sum(sizes)) if rows else (sum(sizes),)
            self.flat = torch.empty(shape, dtype=first.dtype, device=first.device)
            self.parts = [c.view(p.shape) for c, p in zip(self.flat.split(sizes, -1), params)]
            self.rows = list(self.flat) if rows else []  # made once: iterating unbinds
            self._key = key
        return self


class ChainGenerators:
    """One generator per chain for kernels that step all chains at once (``chain_method=
    "vmap"``): parameters carry a leading chain dimension, and chain c's noise is drawn
    from its own generator exactly as the one-chain-at-a-time loop would draw it."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators
        self._layout = _NoiseLayout()

    def noise_like(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Noise shaped like the chain-stacked ``params``: row c of one (chain, d) buffer
        drawn from generator c in one call, exactly as the loop draws chain c's. The
        buffer and its per-parameter views are reused from call to call (the kernels use
        the noise at once), so a step allocates nothing."""
        layout = self._layout.fit(params, rows=len(self.generators))
        for row, g in zip(layout.rows, self.generators):
            torch.randn(row.shape, generator=g, out=row)
        return layout.parts


def gaussian_noise(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Standard normal noise shaped like ``params``, drawn in one call from ``generator``
    (or per chain, from a :class:`ChainGenerators`), in new tensors. The kernels draw the
    same numbers into a buffer they reuse (:class:`NoiseBuffer`)."""
    return NoiseBuffer()(params, generator)


class NoiseBuffer:
    """:func:`gaussian_noise` into one buffer reused from call to call, as
    :class:`ChainGenerators` does for the batched chains: the same numbers from the same
    generator, without a new tensor, its split and its views at every step (~20 µs of a
    10k-parameter model's ~600 µs step on one CPU thread). For a kernel's own use: the
    noise it returns is overwritten by the next call, so a kernel holding one is for one
    thread at a time."""

    def __init__(self):
        self._layout = _NoiseLayout()

    def __call__(self, params: list[torch.Tensor], generator) -> list[torch.Tensor]:
        if isinstance(generator, ChainGenerators):
            return generator.noise_like(params)
        layout = self._layout.fit(params)
        torch.randn(layout.flat.shape, generator=generator, out=layout.flat)
        return layout.parts


_HALF = (torch.float16, torch.bfloat16)


def kernel_arguments(step_size, nbeta, localization, center):
    """A kernel constructor's arguments checked: ε (> 0), nβ (> 0) and γ (>= 0) by name,
    a copy of ``center`` = w* (name -> tensor), and the list ``init`` fills with it in the
    parameters' order (:func:`order_center`). The copy because the chain's parameters move
    in place: a center that is the same dict or tensors as the parameters given to ``init``
    (the usual start at w*) would move with them and the localization would vanish."""
    from slt import _checks

    if not isinstance(center, Mapping) or not center:
        raise TypeError(f"center must be a non-empty dict of name -> tensor (w*), got {center!r}")
    for name, value in center.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"center[{name!r}] must be a tensor, got {type(value).__name__}")
    return (
        _checks.real("step_size", step_size, minimum=0, strict=True),
        _checks.real("nbeta", nbeta, minimum=0, strict=True),
        _checks.real("localization", localization, minimum=0),
        {name: value.detach().clone() for name, value in center.items()},
        [],
    )


def order_center(params, center: dict[str, torch.Tensor], anchor: list) -> None:
    """Fill ``anchor`` with ``center``'s tensors in the order of ``params``, matched by name
    (by position, a center whose keys came in another order was paired with the wrong
    parameters), after checking names, shapes and dtypes."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError(f"params must be a non-empty dict of name -> tensor, got {params!r}")
    if set(params) != set(center):
        raise ValueError(
            f"params and center must name the same tensors: params has "
            f"{sorted(set(params) - set(center))} that center lacks, center "
            f"{sorted(set(center) - set(params))} that params lack"
        )
    for name, p in params.items():
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dtype in _HALF:
            raise TypeError(
                f"params[{name!r}] must be a float32 or float64 tensor, got "
                f"{getattr(p, 'dtype', type(p).__name__)} (half precision loses the drift)"
            )
        if center[name].shape != p.shape:
            raise ValueError(
                f"center[{name!r}] has shape {tuple(center[name].shape)}, params[{name!r}] "
                f"{tuple(p.shape)}"
            )
    anchor[:] = [center[name].to(params[name].dtype) for name in params]


def check_generator(generator) -> None:
    """A kernel's ``generator``: a ``torch.Generator`` (or ChainGenerators); None would draw
    from torch's global state, which the kernels never touch."""
    if not isinstance(generator, (torch.Generator, ChainGenerators)):
        raise TypeError(
            f"generator must be a torch.Generator (the kernels draw from no global state), "
            f"got {generator!r}"
        )


def unaliased(grads: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``grads``, or a copy of them where one is one of ``params`` (a hand-written
    ``grad_fn`` of ½‖w‖² returning w itself), which the step is about to update in place."""
    if any(g is p for g, p in zip(grads, params)):
        return [g.clone() for g in grads]
    return grads


def localized_drift(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    center: list[torch.Tensor],
    *,
    nbeta: float,
    localization: float,
    fresh: bool = False,
) -> list[torch.Tensor]:
    """Gradient of the localized tempered log density, -nβ ∇L_B(w) - γ (w - w*).

    Overwrites and returns ``grads``, unless one of them is one of ``params`` (a
    hand-written ``grad_fn`` of ½‖w‖² returning w itself): then a copy, or the drift
    would be written into the parameters. With ``fresh``, always new tensors (for a drift
    kept across steps: a ``grad_fn`` may write every call's gradient into the same buffers).
    """
    if fresh:
        grads = torch._foreach_mul(grads, -nbeta)
    else:
        grads = unaliased(grads, params)
        torch._foreach_mul_(grads, -nbeta)
    if localization != 0.0:
        torch._foreach_add_(grads, params, alpha=-localization)
        torch._foreach_add_(grads, center, alpha=localization)
    return grads
