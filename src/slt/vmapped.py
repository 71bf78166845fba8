"""All chains in one batched step: ``chain_method="vmap"``.

The chain parameters carry a leading chain dimension (chain, ...). One vmapped forward pass
gives every chain's minibatch loss, and one ordinary backward pass of their sum gives every
chain's gradient (chains do not interact); the kernel's foreach updates then act on all
chains at once. Each chain keeps its own data order and noise generator
(:class:`slt.samplers.base.ChainGenerators`), so chain c sees the same batches and noise as
in the one-chain-at-a-time loop, and the numbers agree with the loop up to floating-point
reassociation (tested).

For small models the step is dominated by per-operation overhead, which vmap pays once for
all chains: measured on 2 CPU cores with the defaults, 16 chains of a 10-parameter
regression took 71 µs per chain-step against 386 µs in the loop (benchmarks/bench_vmap.py).
The gradient control variate evaluates w* in the same pass as the chains (w and w* stacked
to 2C "chains"). The MALA acceptance of SGLD moves (every ``acceptance_every`` steps) is
computed per chain by :func:`slt.samplers.mala.move_log_ratio`, reduced over each chain's
parameters. The gradient pass is replayed from a traced graph of its ATen operations
(:mod:`slt.traced`) — traced in runs of :data:`slt.traced.MIN_STEPS` steps or more, reused
by any run after — the same operations without the Python around them, so the same
numbers, about twice as fast on a small model. Kernels whose update reduces over all
parameters (SGNHT's thermostat, MALA's accept test) and per-sample recording are not
supported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.func import vmap
from tqdm.auto import tqdm

from slt import traced as tracing
from slt.chains import _CHECK_EVERY, Trace, chain_generators, flush_denormals
from slt.factors import LinearFactors
from slt.passes import ChainPass
from slt.posterior import Posterior
from slt.samplers.base import ChainGenerators, Kernel
from slt.samplers.mala import acceptance_probability, move_log_ratio
from slt.traced import has_hooks

VMAP_SAMPLERS = ("sgld", "rmsprop_sgld")
# chain_method="auto" takes vmap from this many chains: 4 where the pass runs eagerly, 2
# where it will be traced (bench_vmap.py, 1 thread: traced vmap over the loop was 1.0-1.3x
# at 1 chain, 1.2-2.0x at 2, eager vmap 0.6-0.9x at 1 chain, 1.06-1.3x at 2, 1.2-1.7x at 3)
VMAP_MIN_CHAINS = 4
VMAP_MIN_CHAINS_TRACED = 2
# ... and up to this many sampled parameters: on CPU, 4 chains, vmap (eager / traced) vs
# the loop was 1.18x / 1.30x at 83k parameters, 1.00x / 1.07x at 198k, 0.88x / 0.92x at
# 395k and 0.49x / 0.50x at 1.05M (benchmarks/bench_vmap.py, README "Chains in one batched
# step")
VMAP_MAX_PARAMS = 100_000
# ... and while the batched pass's activations stay small: the leaf modules' outputs on one
# batch, times the rows of the pass (chains, twice that with the gradient control variate),
# at most this many numbers. The pass keeps every row's activations for the backward, and
# where they are large the step is arithmetic, which batching does not cut: plain SGLD, 4
# chains, per chain-step loop ÷ traced vmap was 2.7x / 2.0x at 24k / 46k numbers per chain
# (a tiny transformer, the 10k MLP), 1.2-1.7x at 131k-185k, 1.36x at 311k and 1.09x at 623k
# (the benchmark's transformer, whose defaults then took +89 MB against the loop's ~+20)
VMAP_MAX_ACTIVATIONS = 2**21
# With the gradient control variate, from this many sampled parameters the batched step
# takes ∇L_B(w*) from the factors of nn.Linear layers (slt.factors) where a model has them,
# instead of stacking w* into the pass as C more rows: ReLU MLPs at 4 chains, 600 steps, one
# thread, per estimate rows ÷ factors 0.99x at 10k parameters, 1.01-1.04x at 20k, 1.08x
# (twice) at 31k, 1.11-1.13x at 45k, 1.12x at 83k; the table costs memory (12-18 MB at
# n = 4,096), so below ~30k, where the step gains little, the rows stay
VMAP_FACTORS_MIN_PARAMS = 30_000


def center_factors(posterior: Posterior) -> LinearFactors | None:
    """The factors of nn.Linear layers (:mod:`slt.factors`) from which the batched step
    takes the gradient control variate's ∇L_B(w*) instead of C more rows in its pass: from
    :data:`VMAP_FACTORS_MIN_PARAMS` sampled parameters, where the model has them; else None
    (recording them on first use)."""
    if posterior.control_variate != "gradient" or posterior.num_params < VMAP_FACTORS_MIN_PARAMS:
        return None
    return posterior.factors


def center_table(posterior: Posterior) -> torch.Tensor | None:
    """The (n/m, d) table of ∇L_B(w*) over micro-batches (``microbatch``) from which the
    batched step takes the gradient control variate, or None."""
    if posterior.control_variate != "gradient" or posterior.microbatch is None:
        return None
    return posterior.cache_grad


def center_loss_table(posterior: Posterior) -> bool:
    """Whether the batched step reads the loss control variate's L_B(w*) from the table of
    losses at w* (a gather of n numbers, or n/m with micro-batches). The gradient control
    variate does not use the per-sample table here: gathering and averaging the batch's rows
    of the (n, d) table cost more than stacking w* into the chains' pass (regular(10), 4
    chains: 1.14 s against 1.29 s; rrr(20,10,10,3): 1.49 s against 1.70 s)."""
    return posterior.control_variate == "loss" and posterior.cache_loss is not None


def stacks_center(posterior: Posterior) -> bool:
    """Whether the batched step's pass holds w* as C more rows: the gradient control
    variate, with neither a micro-batch table nor the factors to read ∇L_B(w*) from."""
    return (
        posterior.control_variate == "gradient"
        and center_table(posterior) is None
        and center_factors(posterior) is None
    )


def stacked(tensors: dict[str, torch.Tensor], num_chains: int) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` with a leading chain dimension of size ``num_chains``."""
    return {
        k: v.detach().unsqueeze(0).repeat(num_chains, *[1] * v.dim()) for k, v in tensors.items()
    }


def _stack_batches(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(batches)
    if isinstance(first, dict):
        return {k: _stack_batches([b[k] for b in batches]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack_batches(list(parts)) for parts in zip(*batches))
    raise TypeError(f"chain_method='vmap' needs batches of tensors, got {type(first).__name__}")


# (state, step) with step(state, batch, noise, index) -> (state, L_B(w) (chain,), L_B(w*)
# (chain,) or None); index: the (chain, b) sample indices of the batch, or None
Stepper = tuple[Any, Callable[[Any, Any, ChainGenerators, Any], tuple[Any, torch.Tensor, Any]]]


def check_batched_gradient(posterior: Posterior) -> None:
    """Raise ``ValueError`` unless the batched pass's ∇L_B(w*) equals the model's own on a
    batch (up to rounding). A model that reads a sampled parameter other than through its
    registered attribute (a tensor kept in a list, a closure) is not swapped by
    ``functional_call``: vmapped chains would hold that parameter at w*, silently."""
    padded = [name for name, m in posterior.module.named_modules()
              if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None
              and any(m.weight is p for p in posterior.params.values())]  # fmt: skip
    if padded:
        # torch.func applies padding_idx to the first chain only (PyTorch 2.13): the other
        # chains' padding rows took a gradient, and λ̂ differed from the loop's
        raise ValueError(
            f"chain_method='vmap': nn.Embedding {', '.join(padded)} has a padding_idx, which "
            "torch.func.vmap honours for the first chain only (the others' padding rows "
            "would move); use chain_method='loop' (or 'auto', which falls back to it)"
        )
    batch = (
        posterior.full_data
        if posterior.full_data is not None
        else next(iter(posterior.batches.complete_pass()))
    )
    chain_pass = ChainPass(posterior)
    # two chains at w*: a batching rule that treats only the first chain right fails too
    center = [torch.stack([v.detach(), v.detach()]) for v in posterior.center.values()]
    try:
        batched, _ = chain_pass.gradients(_stack_batches([batch, batch]), *center,
                                          *chain_pass.extras)  # fmt: skip
    except RuntimeError as err:  # what torch.func says is about its batching, not the model
        raise RuntimeError(
            f"chain_method='vmap': torch.func.vmap cannot run the model's pass ({err}). An "
            "operation without a batching rule, a forward that updates a buffer from the "
            "batch (a running statistic) or one that branches on a tensor's value cannot be "
            "batched; use chain_method='loop' (or 'auto', which falls back to it)"
        ) from err
    params = list(posterior.reset().values())
    loss = posterior.loss(posterior.module, batch)
    own = posterior._grads(loss, params)
    own = torch.cat([g.detach().reshape(-1) for g in own]).double()
    gap = max(float((torch.cat([g[c].reshape(-1) for g in batched]).double() - own).norm())
              for c in range(2))  # fmt: skip
    # what it catches is gross (a parameter's whole gradient missing); rounding, even near
    # a minimum where the gradient is itself rounding, stays far inside this
    rounding = 1e3 * torch.finfo(posterior.dtype).eps * max(1.0, abs(float(loss.detach())))
    if not gap <= 1e-2 * float(own.norm()) + rounding * math.sqrt(own.numel()):
        raise ValueError(
            f"chain_method='vmap': the batched pass's gradient at w* differs from the model's "
            f"own (|difference| {gap:.3g} against |gradient| {float(own.norm()):.3g}): the "
            "model reads a sampled parameter other than through its attribute (kept in a "
            "list or a closure), which torch.func cannot swap, or its forward updates state "
            "that its output reads (a buffer changed in place), which the batched step "
            "updates once for all chains; use chain_method='loop'"
        )


def eager_step(posterior: Posterior, kernel: Kernel, num_chains: int, *,
               trace: bool = False) -> Stepper:  # fmt: skip
    """The initial state and the step of ``kernel`` on all chains at once, in eager mode.
    The chains' gradient pass is replayed from a traced graph where one can be
    (:mod:`slt.traced`; same numbers): traced now if ``trace``, else only a graph kept from
    an earlier run."""
    chain_pass = ChainPass(posterior)
    names = posterior.names
    keys, extras, loss = chain_pass.keys, chain_pass.extras, chain_pass.loss
    fast_pass = chain_pass.replayed(posterior, trace=trace)

    def grad_chains(params: list[torch.Tensor], batch):
        return fast_pass(batch, *params, *extras)

    center = [v.detach() for v in posterior.center.values()]
    mode = posterior.control_variate
    table = center_table(posterior)
    factors = None if table is not None else center_factors(posterior)
    stacked_center = stacks_center(posterior)  # w* as C more rows of the pass
    if stacked_center:
        # w and w* of every chain in one (2C, ...) tensor per parameter: rows :C are the
        # kernel's parameters (updated in place), rows C: stay w*, so the pass that
        # evaluates both needs no concatenation
        both = [torch.cat([s, s]) for s in stacked(dict(zip(names, center)), num_chains).values()]
        params = {n: b[:num_chains] for n, b in zip(names, both)}
    else:
        params = stacked(dict(zip(names, center)), num_chains)
        if mode == "loss":
            at_center = vmap(loss, in_dims=(0, *[None] * len(keys)))
    state = kernel.init(params)
    if any(state.params[n] is not params[n] for n in names):
        raise RuntimeError("eager_step: the kernel must update the parameters it is given in place")

    def with_center(params, batch, record, out):
        """The gradient control variate in one pass: w (chains) and w* (one copy per
        chain, on that chain's batch) as 2C "chains", one vmapped forward and one backward;
        returns ∇L_B(w) − ∇L_B(w*) + ∇L_n(w*) and L_B(w), and puts L_B(w*) in ``out``.
        Halves the per-step calls of two separate passes."""
        c = num_chains
        grads, values = grad_chains(both, _twice(batch))
        plain = [g[:c] for g in grads]
        if record is not None:
            record[:] = [g.clone() for g in plain]
        torch._foreach_sub_(plain, [g[c:] for g in grads])
        torch._foreach_add_(plain, posterior.init_grad)
        out.append(values[c:])
        return plain, values[:c]

    def with_read_center(params, batch, index, record, out):
        """The gradient control variate with ∇L_B(w*) read, not computed: the chains'
        pass, then ∇L_B(w) − ∇L_B(w*) + ∇L_n(w*), with ∇L_B(w*) and L_B(w*) from the
        micro-batch table or from the factors and the per-sample losses."""
        grads, values = grad_chains(list(params.values()), batch)
        if record is not None:
            record[:] = [g.clone() for g in grads]
        if table is not None:
            correction, center_loss = posterior.table_correction(index)
            torch._foreach_sub_(grads, correction)
        else:
            torch._foreach_add_(grads, factors.gradient_sums(index), alpha=-1.0 / index.shape[-1])
            torch._foreach_add_(grads, posterior.init_grad)
            center_loss = posterior.table_loss(index)
        out.append(center_loss)
        return grads, values

    def grad_fn(params, batch, record=None):
        grads, value = grad_chains(list(params.values()), batch)
        if record is not None:  # the plain ∇L_B(w_t), for the acceptance probe
            record[:] = [g.detach().clone() for g in grads]
        return grads, value

    cached = center_loss_table(posterior)

    def step(state, batch, noise, index=None, record=None):
        center_loss = None
        if cached and index is not None:
            center_loss = posterior.table_loss(index)
        elif mode == "gradient":
            out: list[torch.Tensor] = []
            center_grad = (
                partial(with_center, record=record, out=out)
                if stacked_center
                else partial(with_read_center, index=index, record=record, out=out)
            )
            state, info = kernel.step(state, center_grad, batch, noise)
            return state, info.loss, out[0]
        elif mode == "loss":
            with torch.no_grad():
                center_loss = at_center(batch, *center, *extras)
        step_grad = grad_fn if record is None else partial(grad_fn, record=record)
        state, info = kernel.step(state, step_grad, batch, noise)
        return state, info.loss, center_loss

    def probe(params: list[torch.Tensor], batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The chains' plain (∇L_B(w), L_B(w)) at ``params``, for the acceptance probe,
        from the step's own pass (replayed from its traced graph where the step's is): where
        w* rides in that pass as C more rows, the chains' parameters fill both halves. On
        the 10k MLP at 4 chains that took 1.8 ms a probe against 3.1 for an eager pass of
        C rows."""
        if stacked_center:
            grads, values = grad_chains([torch.cat([p, p]) for p in params], _twice(batch))
            return [g[:num_chains] for g in grads], values[:num_chains]
        return grad_chains(params, batch)

    step.probe = probe
    return state, step


def vmap_min_chains(module: torch.nn.Module, num_steps: int) -> int:
    """The fewest chains from which ``chain_method="auto"`` takes vmap for ``module`` in a
    run of ``num_steps`` steps: fewer where the gradient pass will be traced. (An untraced
    fallback at 2 chains still runs about as fast as the loop.)"""
    if tracing.enabled and num_steps >= tracing.MIN_STEPS and not has_hooks(module):
        return VMAP_MIN_CHAINS_TRACED
    return VMAP_MIN_CHAINS


def activations(posterior: Posterior, batch: Any) -> int:
    """How many numbers the leaf modules of the posterior's model output while the loss is
    evaluated on ``batch`` at w* (forward hooks on its reference copy, removed after), and
    the attention maps of its ``nn.MultiheadAttention`` modules (batch × heads × queries ×
    keys, which no leaf outputs: a long sequence's maps dwarf the rest)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor))

    def maps(module, args, kwargs, _output):
        nonlocal total
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        if isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and key.dim() > 1:
            keys = key.shape[1] if module.batch_first and key.dim() == 3 else key.shape[0]
            total += query.numel() // query.shape[-1] * keys * module.num_heads

    module = posterior.reference
    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    hooks += [m.register_forward_hook(maps, with_kwargs=True) for m in module.modules()
              if isinstance(m, torch.nn.MultiheadAttention)]  # fmt: skip
    try:
        with torch.no_grad():
            posterior.loss(module, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def _chain_params(state) -> list[torch.Tensor]:
    """The chain-stacked parameters of a kernel's state or of the compiled step's."""
    return list(state.params.values()) if hasattr(state, "params") else state[0]


def _twice(batch: Any) -> Any:
    """A chain-stacked batch repeated along the chain dimension: (2C, ...)."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch])
    if isinstance(batch, dict):
        return {k: _twice(v) for k, v in batch.items()}
    return type(batch)(_twice(v) for v in batch)


def run_chains_vmap(
    posterior: Posterior,
    kernel: Kernel,
    *,
    num_chains: int,
    num_steps: int,
    seed: int,
    progress: bool = True,
    stepper: Stepper | None = None,
    acceptance_every: int = 0,
    step_size: float | None = None,
) -> Trace:
    """Like :func:`slt.chains.run_chains`, every chain in each step at once. The kernel
    must be built with a chain-stacked ``center`` (see :func:`stacked`). ``stepper``, if
    given, replaces :func:`eager_step` (``kernel`` is then unused), e.g. the compiled step
    of :func:`slt.compiled.compiled_step`. With ``acceptance_every = k > 0`` (SGLD only) the
    MALA acceptance of the move at step size ``step_size`` is recorded at steps 0, k, 2k,
    ..., as in the loop, from the step's ``probe(params, batch) -> (∇L_B, L_B)``."""
    mode = posterior.control_variate
    eager = stepper is None
    trace = num_steps >= tracing.MIN_STEPS  # shorter runs use only graphs traced before
    state, step = stepper or eager_step(posterior, kernel, num_chains, trace=trace)
    if acceptance_every and (step_size is None or not hasattr(step, "probe")):
        raise ValueError("run_chains_vmap: acceptance_every > 0 needs step_size and a step "
                         "with a probe")  # fmt: skip
    center = [v.detach().unsqueeze(0) for v in posterior.anchor.values()]
    record: list[torch.Tensor] = []
    shape = (num_chains, num_steps)
    losses = torch.full(shape, float("nan"), device=posterior.device, dtype=torch.float64)
    center_losses = torch.full_like(losses, posterior.init_loss if mode == "none" else float("nan"))
    pairs = [chain_generators(seed, c, posterior.device) for c in range(num_chains)]
    tensors = posterior.batches.tensors if posterior.full_data is None else None
    if tensors is not None:  # (chain, batch) indices, one gather for all chains
        indices = posterior.batches.chain_indices([data for data, _ in pairs])
    else:
        streams = [posterior.stream(data) for data, _ in pairs]
    noise = ChainGenerators([g for _, g in pairs])
    steps_run = np.zeros(num_chains, dtype=np.int64)
    bar = tqdm(total=num_chains * num_steps, disable=not progress, desc="sampling", unit="step")
    acceptance = torch.full_like(losses, float("nan"))
    with flush_denormals():
        for t in range(num_steps):
            if tensors is not None:
                index = next(indices)
                batch = [t[index] for t in tensors]
            else:
                index, batch = None, _stack_batches([next(s)[0] for s in streams])
            probing = acceptance_every and t % acceptance_every == 0
            if probing:
                start = [p.detach().clone() for p in _chain_params(state)]
                if not eager:  # the compiled step keeps no plain ∇L_B(w_t): one more pass
                    record, _ = step.probe(start, batch)
            if eager:
                state, loss, center_loss = step(state, batch, noise, index,
                                                record if probing else None)  # fmt: skip
            else:
                state, loss, center_loss = step(state, batch, noise, index)
            if probing:
                params = _chain_params(state)
                grad_new, loss_new = step.probe(params, batch)
                with torch.no_grad():
                    log_ratio = move_log_ratio(
                        start, params, record, grad_new, loss, loss_new, center,
                        nbeta=posterior.nbeta, localization=posterior.localization,
                        step_size=step_size, chains=True,
                    )  # fmt: skip
                    acceptance[:, t] = acceptance_probability(log_ratio)
            losses[:, t] = loss
            if center_loss is not None:
                center_losses[:, t] = center_loss
            if (t + 1) % _CHECK_EVERY == 0 or t + 1 == num_steps:
                bar.update(num_chains * (t + 1) - int(steps_run.sum()))
                steps_run[:] = t + 1
                if not torch.isfinite(losses[:, t]).any():
                    break
    bar.close()
    with torch.no_grad():  # as after the loop: the posterior holds the last chain's last draw
        torch._foreach_copy_(list(posterior.params.values()), [w[-1] for w in _chain_params(state)])
    diverged = ~torch.isfinite(losses[:, : int(steps_run.max())]).all(dim=1).cpu().numpy()
    return Trace(
        losses.cpu().numpy(),
        center_losses.cpu().numpy(),
        diverged,
        steps_run,
        acceptance.cpu().numpy(),
    )
