"""The model's loss and gradient as functions of its parameters passed as tensors.

``functional_call`` swaps the parameters and buffers in for one call, so a pass can run
at any parameter set — a chain's, w*, every chain's stacked — and, with the model's Python
taken out of it, be replayed from a traced graph (:mod:`slt.traced`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, vmap

from slt import traced as tracing
from slt.losses import LossModule
from slt.traced import TracedPass, fingerprint, has_hooks

if TYPE_CHECKING:
    from slt.posterior import Posterior


class ChainPass:
    """Every chain's loss and gradient at chain-stacked parameters, in eager mode.

    ``loss(batch, *tensors)`` is one chain's L_B, with the sampled parameters followed by
    :attr:`extras` (everything else the model reads: frozen parameters and buffers, passed
    unbatched, so that a traced graph holds no tensor of the posterior);
    ``gradients(batch, *tensors)`` is the chains' (∇L_B, L_B) from it; ``keys`` are the names
    ``functional_call`` sees."""

    def __init__(self, posterior: Posterior):
        module = LossModule(posterior.module, posterior.loss_fn, attention=posterior.attention)
        # unbatched, attention runs as in the loop's eager pass (Posterior.loss): on PyTorch's
        # own kernel past the short sequences done by parts, so a traced graph of it matches
        # that pass bit for bit (on the math backend it did not, past 12 keys, and was dropped)
        unbatched = LossModule(posterior.module, posterior.loss_fn,
                               attention=posterior.attention, math_backend=False)  # fmt: skip
        names = posterior.names
        fixed = fixed_tensors(posterior.module, names)
        self.keys = [f"model.{n}" for n in [*names, *fixed]]
        self.extras = list(fixed.values())
        self.tied = _has_tied_parameters(posterior.module)
        self.sampled = len(names)
        keys, tied, shared = self.keys, self.tied, has_shared_modules(posterior.module)

        def loss(batch: Any, *tensors: torch.Tensor, module=module) -> torch.Tensor:
            # parameters as positional tensors: vmap flattens a tuple faster than a dict, and
            # functional_call skips its tied-weights bookkeeping where nothing is tied
            return swapped_call(module, dict(zip(keys, tensors)), (batch,), tie_weights=tied,
                                shared=shared)  # fmt: skip

        self.loss = loss
        self._unbatched_loss = partial(loss, module=unbatched)
        self.forward = vmap(loss, in_dims=(0, *[0] * len(names), *[None] * len(self.extras)))

    def gradients(self, batch, *tensors: torch.Tensor):
        """Every chain's ∇L_B and L_B: a vmapped forward pass, then one ordinary backward
        pass of Σ_c L_B(w_c) — chains do not interact, so its gradient with respect to the
        stacked parameters is the per-chain gradients (bit-identical to
        ``vmap(grad_and_value(loss))`` and 1.3-1.6x faster on CPU)."""
        params, rest = tensors[: self.sampled], tensors[self.sampled :]
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            values = self.forward(batch, *leaves, *rest)
            grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
        return grads, values.detach()

    def gradient(self, batch, *tensors: torch.Tensor):
        """One parameter set's ∇L_B and L_B, unbatched: the loop's pass."""
        params, rest = tensors[: self.sampled], tensors[self.sampled :]
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad():
            value = self._unbatched_loss(batch, *leaves, *rest)
            grads = gradients_of(value, leaves)
        return grads, value.detach()

    def replayed(self, posterior: Posterior, *, trace: bool, alone: bool | None = None,
                 batched: bool = True, eager: Callable | None = None,
                 state: Callable[[], Any] | None = None) -> Callable:  # fmt: skip
        """:meth:`gradients` (``batched``) or :meth:`gradient`, replayed from a traced graph
        where one can be (:mod:`slt.traced`; same numbers): traced now if ``trace``, else
        only a graph kept from an earlier run; ``eager`` (default: the pass itself) where
        there is none, where tracing is off or where the model has hooks (and what a graph
        is checked against); ``state``: see :class:`slt.traced.TracedPass`. ``alone``
        (default ``trace``) replaces ``trace`` where the graph cannot be kept for other runs
        (Python state that cannot be fingerprinted): whether this run alone repays a trace."""
        fn = self.gradients if batched else self.gradient
        eager = fn if eager is None else eager
        if not tracing.enabled or has_hooks(posterior.module):
            return eager
        shape = fingerprint(posterior.module), fingerprint(posterior.loss_fn)
        key = None if None in shape else (*shape, tuple(self.keys), self.tied, batched)
        if key is None and alone is not None:
            trace = alone
        if trace or key is not None:
            return TracedPass(fn, key, trace=trace, module=posterior.module, eager=eager,
                              state=state)  # fmt: skip
        return eager


def swapped_call(module: torch.nn.Module, tensors: dict[str, torch.Tensor], args: tuple, *,
                 tie_weights: bool = True, shared: bool) -> Any:  # fmt: skip
    """``functional_call(module, tensors, args)`` that leaves ``module`` as it found it also
    where a submodule is registered under two names (``shared``,
    :func:`has_shared_modules`): there ``torch.func.functional_call`` leaves a swapped-in
    tensor behind (torch 2.13), a batched one after ``vmap``, which the next call trips
    over."""
    if not shared:
        return functional_call(module, tensors, args, tie_weights=tie_weights)
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        return functional_call(module, tensors, args, tie_weights=tie_weights)
    finally:
        for m, parameters, buffers in saved:
            for own, kept in ((m._parameters, parameters), (m._buffers, buffers)):
                own.clear()
                own.update(kept)


def has_shared_modules(module: torch.nn.Module) -> bool:
    """Whether a submodule of ``module`` is registered under more than one name."""
    every = sum(1 for _ in module.named_modules(remove_duplicate=False))
    return every != sum(1 for _ in module.named_modules())


def fixed_tensors(module: torch.nn.Module, sampled: list[str]) -> dict[str, torch.Tensor]:
    """What else ``module`` reads besides its ``sampled`` parameters: the other parameters,
    then the buffers, detached, by name (the order :class:`ChainPass` passes them in)."""
    fixed = {n: t.detach() for n, t in module.named_parameters() if n not in sampled}
    fixed.update((n, t.detach()) for n, t in module.named_buffers())
    return fixed


def gradients_of(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇ ``loss`` with respect to ``params``, zeros for a parameter it does not read."""
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a loss that does not depend on the sampled parameters through "
            "autograd (detached, made from .item(), or computed under torch.no_grad()), or "
            "the model's forward reads none of them (params=); return the mean NLL as a "
            "tensor computed from the model's output"
        )
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # nn.Embedding(sparse=True) gives sparse gradients; the samplers update in place, dense
    return [
        torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
        for g, p in zip(grads, params)
    ]


def _has_tied_parameters(module: torch.nn.Module) -> bool:
    """Whether one parameter is registered under more than one name."""
    every = sum(1 for _ in module.named_parameters(remove_duplicate=False))
    return every != sum(1 for _ in module.named_parameters())
