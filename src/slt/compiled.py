"""The batched step of ``chain_method="vmap"`` under ``torch.compile``: ``compile=True``.

One call of the compiled function does what one step of :mod:`slt.vmapped` does for all
chains: ``vmap(grad_and_value(L_B))`` at the chain parameters, the control variate at w*
on the same batches (or, where the eager step reads it from a table — micro-batches for
the gradient one, per-sample losses for the loss one — read outside the graph as there),
and the SGLD (or pSGLD) update

    w ← w + (ε/2) (-nβ g - γ (w - w*)) + √ε ξ,   g = ∇L_B(w) - ∇L_B(w*) + ∇L_n(w*)

(Welling & Teh 2011; Lau et al. 2023, arXiv 2308.12108, eq. 9), fused into one graph by
TorchInductor. The batches and the noise ξ are drawn outside the graph, from each chain's
own generators exactly as the eager path draws them, so the numbers equal the eager vmap
path up to floating-point reassociation (tested). The MALA acceptance probe of SGLD moves
(``acceptance_every``) runs outside the graph (its passes replayed from a traced graph,
:mod:`slt.traced`), with one more gradient pass than in the eager step (at the move's
start, whose plain gradient the fused step does not keep).

The compiled function is cached for the life of the process, keyed by what fixes its
graph: the model's class and the names, shapes, dtypes and device of its parameters and
buffers, the loss function's type, the plain Python state of both where it can be summarized
(:func:`slt.traced.fingerprint`: a loss's σ, a layer's ε), the sampler, the control variate,
the number of chains and the batch shapes. Everything else — the values of w*, of the
frozen parameters and buffers, ε, nβ and γ — enters as a tensor argument, so the next
checkpoint of the same model, or another step size, reuses the compiled code without
recompiling. Should an entry still need a new graph (torch's guards see a different Python
value the key could not summarize, a closure's, say), torch recompiles it rather than reuse
a wrong one, and at torch's recompile limit the entry is compiled afresh; ``compilations``
counts every graph compiled.

Measured on one CPU thread (benchmarks/README.md, "torch.compile"): on a 10-parameter and
a 10k-parameter model 1.2-1.4x fewer µs per chain-step than the traced pass
(:mod:`slt.traced`) that runs of 500 steps or more use by default, after 2-12 s of
compilation per model shape, so there it pays for long sweeps over many estimates of one
architecture (training checkpoints); on a 17k-parameter transformer, whose step is many
small operations, 1.8x fewer (6.1 against 11.0 ms) after 25 s, repaid within about one
default estimate.

Examples
--------
>>> for model in checkpoints:  # doctest: +SKIP
...     res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), chain_method="vmap",
...                            compile=True)  # compiles on the first only
"""

from __future__ import annotations

import inspect
import math
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad_and_value, vmap

from slt.attention import plain_attention
from slt.losses import LossModule
from slt.passes import ChainPass, has_shared_modules, swapped_call
from slt.posterior import Posterior
from slt.samplers import rmsprop_sgld
from slt.samplers.base import ChainGenerators
from slt.traced import fingerprint
from slt.vmapped import (
    VMAP_SAMPLERS,
    Stepper,
    center_loss_table,
    center_table,
    stacked,
)

_RMSPROP = inspect.signature(rmsprop_sgld).parameters  # its defaults, as SAMPLERS builds it
_ALPHA, _EPS = _RMSPROP["alpha"].default, _RMSPROP["eps"].default

compilations = 0  # graphs compiled so far in this process (a test counts recompiles with it)
_COMPILED: OrderedDict[tuple, Callable] = OrderedDict()
MAX_COMPILED = 64
"""Compiled steps kept (least recently used dropped): a sweep over many loss settings
compiles one per setting."""


def _inductor(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """TorchInductor, counting each graph it is asked to compile."""
    global compilations
    compilations += 1
    return torch._inductor.compile(graph, example_inputs)


def _step(module, w, square_avg, batch, noise, center, anchor, init_grad, hyper, *, names,
          sampler, control_variate, shared=False):  # fmt: skip
    """One step of every chain; returns (w, square_avg, L_B(w), L_B(w*) or None).

    ``w``, ``square_avg``, ``noise``: lists of (chain, ...) tensors; ``center`` (w*, for
    the control variate), ``anchor`` (where γ pulls) and ``init_grad`` (∇L_n(w*)): lists
    shaped like one chain's parameters; ``hyper``: (5,) tensor [ε/2, √ε, nβ, γ, 1 while
    RMSprop's V adapts else 0]. With ``control_variate="read"`` (micro-batch tables),
    ``init_grad`` is instead the chains' correction ∇L_B(w*) − ∇L_n(w*), (chain, ...)
    tensors read from the table."""

    def loss(params, batch):
        return swapped_call(module, {f"model.{n}": p for n, p in zip(names, params)},
                            (batch,), shared=shared)  # fmt: skip

    grads, value = vmap(grad_and_value(loss), in_dims=(0, 0))(w, batch)
    center_loss = None
    if control_variate == "read":  # ∇L_B(w*) − ∇L_n(w*) read from a table, outside the graph
        grads = [g - c for g, c in zip(grads, init_grad)]
    elif control_variate == "gradient":
        grads0, center_loss = vmap(grad_and_value(loss), in_dims=(None, 0))(center, batch)
        grads = [g - (g0 - gn) for g, g0, gn in zip(grads, grads0, init_grad)]
    elif control_variate == "loss":
        center_loss = vmap(loss, in_dims=(None, 0))(center, batch)
    half, root, nbeta, localization, adapting = hyper.unbind()
    new_w, new_avg = [], []
    for i, (p, g, c, z) in enumerate(zip(w, grads, anchor, noise)):
        drift = g * -nbeta - localization * p + localization * c
        if sampler == "rmsprop_sgld":
            avg = torch.where(adapting > 0, square_avg[i] * _ALPHA + (1 - _ALPHA) * g * g,
                              square_avg[i])  # fmt: skip
            precond = 1 / (avg.sqrt() + _EPS)
            drift, z = drift * precond, z * precond.sqrt()
            new_avg.append(avg)
        new_w.append(p + half * drift + root * z)
    return new_w, new_avg, value, center_loss


class CompileError(RuntimeError):
    """torch.compile could not compile (or run) the batched step of a model and loss."""


def _compile(key: tuple) -> None:
    """A fresh compiled step for ``key``, the least recently used dropped past
    ``MAX_COMPILED``. A fresh code object per key: torch caches compiled graphs (and caps
    their number) per code object, so keys must not share one."""
    fresh = types.FunctionType(_step.__code__.replace(), _step.__globals__)
    _COMPILED[key] = torch.compile(fresh, backend=_inductor, fullgraph=True, dynamic=False)
    while len(_COMPILED) > MAX_COMPILED:
        _COMPILED.popitem(last=False)


def _recompile_limit(err: Exception) -> bool:
    """Whether ``err`` is torch's hard failure at its recompile limit (fullgraph=True)."""
    return type(err).__name__ == "FailOnRecompileLimitHit" or "recompile_limit" in str(err)


def _key(posterior: Posterior, sampler: str, num_chains: int, control_variate: str) -> tuple:
    """What fixes the graph, but for the batch shapes (added per step). The model's and the
    loss's plain Python state (:func:`slt.traced.fingerprint`) where it can be summarized:
    a sweep over a loss's σ, say, then compiles a fresh function per value, where sharing
    one recompiled it under torch's guards until their limit (8) made it a hard error."""
    tensors = [*posterior.module.named_parameters(), *posterior.module.named_buffers()]
    module_state = fingerprint(posterior.module)
    loss_state = fingerprint(posterior.loss_fn)
    return (
        type(posterior.module) if module_state is None else module_state,
        tuple((n, t.shape, t.dtype, t.device, n in posterior.names) for n, t in tensors),
        type(posterior.loss_fn) if loss_state is None else loss_state,
        sampler,
        control_variate,
        num_chains,
    )


def _shapes(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return (batch.shape, batch.dtype, batch.device)
    if isinstance(batch, dict):
        return tuple((k, _shapes(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return tuple(_shapes(v) for v in batch)
    return type(batch)


def compiled_step(
    posterior: Posterior,
    sampler: str,
    step_size: float,
    num_chains: int,
    *,
    adapt_steps: int | None = None,
) -> Stepper:
    """The initial state and step function for :func:`slt.vmapped.run_chains_vmap`, with the
    step compiled once per graph key (see the module docstring) and reused afterwards.

    Parameters
    ----------
    posterior : Posterior
        Its model, loss, control variate, ∇L_n(w*), nβ and γ define the target.
    sampler : {"sgld", "rmsprop_sgld"}
    step_size : float
        ε.
    num_chains : int
    adapt_steps : int, optional
        RMSprop-SGLD: steps over which its preconditioner adapts before it is held (as
        :func:`slt.samplers.rmsprop_sgld`); None adapts throughout.

    Returns
    -------
    (state, step)
        ``state`` holds the chain-stacked parameters (and pSGLD's square averages);
        ``step(state, batch, noise) -> (state, L_B(w), L_B(w*) or None)``.
    """
    if sampler not in VMAP_SAMPLERS:
        raise ValueError(f"compile=True supports samplers {VMAP_SAMPLERS}, got {sampler!r}")
    module = LossModule(posterior.module, posterior.loss_fn, attention=posterior.attention)
    names = tuple(posterior.names)
    center = [posterior.center[n].detach() for n in names]
    anchor = [posterior.anchor[n].detach() for n in names]
    init_grad = [g.detach() for g in posterior.init_grad or [torch.zeros_like(c) for c in center]]
    hyper = torch.tensor(
        [step_size / 2, math.sqrt(step_size), posterior.nbeta, posterior.localization, 1.0],
        dtype=posterior.dtype,
        device=posterior.device,
    )
    w = list(stacked(dict(zip(names, center)), num_chains).values())
    square_avg = [torch.zeros_like(p) for p in w] if sampler == "rmsprop_sgld" else []
    # Where the eager step reads the control variate from a table (the gradient one from
    # micro-batches', the loss one from the per-sample losses), so does this step, outside
    # the graph, which then has no pass at w*.
    read = center_table(posterior) is not None
    read_loss = center_loss_table(posterior)
    control_variate = "read" if read else "none" if read_loss else posterior.control_variate
    options = dict(
        names=names,
        sampler=sampler,
        control_variate=control_variate,
        shared=has_shared_modules(module),
    )
    graph = _key(posterior, sampler, num_chains, control_variate)

    steps = [0]  # taken so far: the preconditioner is held from adapt_steps on

    def step(state, batch, noise: ChainGenerators, index=None):
        w, square_avg = state
        if adapt_steps is not None and steps[0] == adapt_steps:
            hyper[4] = 0.0
        steps[0] += 1
        correction, center_loss = init_grad, None
        if read:
            correction, center_loss = posterior.table_correction(index)
        elif read_loss:
            center_loss = posterior.table_loss(index)
        key = (*graph, _shapes(batch))
        new = key not in _COMPILED
        if new:
            _compile(key)
        _COMPILED.move_to_end(key)
        z = noise.noise_like(w)
        args = (module, w, square_avg, batch, z, center, anchor, correction, hyper)
        try:
            with torch.no_grad(), plain_attention(enabled=posterior.attention):
                try:
                    out = _COMPILED[key](*args, **options)
                except Exception as err:
                    if new or not _recompile_limit(err):
                        raise
                    # state the key does not see (a closure's) made torch recompile this
                    # entry up to its limit: a fresh function, compiled afresh
                    new = True
                    _compile(key)
                    out = _COMPILED[key](*args, **options)
        except Exception as err:
            if not new:
                raise
            del _COMPILED[key]
            cause = (str(err).strip().splitlines() or [""])[0][:500]
            raise CompileError(
                f"compile=True: torch.compile could not compile (or run) the step of this "
                f"model and loss ({type(err).__name__}: {cause}); pass compile=False"
            ) from err
        w, square_avg, loss, in_graph = out
        return (w, square_avg), loss, center_loss if read or read_loss else in_graph

    # the acceptance probe's passes, outside the graph: replayed from a traced graph (traced
    # on the first probe; 10k MLP, 4 chains: 1.0 ms a pass against 3.1 eager)
    chain_pass = ChainPass(posterior)
    probe_pass = chain_pass.replayed(posterior, trace=True)
    step.probe = lambda params, batch: probe_pass(batch, *params, *chain_pass.extras)
    return (w, square_avg), step
