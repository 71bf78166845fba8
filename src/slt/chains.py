"""Drive a kernel over chains and draws and record a ``Trace``.

One generator per chain, seeded from ``(seed, chain)``, so a chain's draws do not depend
on how many chains run or in what order. Nothing is copied to the host inside the loop:
losses are written to preallocated tensors and checked for NaN/Inf every few hundred
steps, so a diverged chain stops early without a per-step synchronisation.

Every ``acceptance_every`` steps the runner can also record the Metropolis-Hastings
acceptance probability that the kernel's move w_t → w_{t+1} would have had as a MALA
proposal with the same step size ε on the same minibatch B_t (Furman & Lau 2024, arXiv
2402.03698): with U(w) = nβ L_B(w) + (γ/2)‖w - w*‖²,

    α = min(1, exp(U(w_t) - U(w_{t+1})) q(w_t|w_{t+1}) / q(w_{t+1}|w_t)),
    q(w'|w) = N(w'; w - (ε/2) ∇U(w), ε I),

from the plain minibatch gradient at both ends (not the control-variate one). It costs a
copy of w_t and one extra forward and backward pass at w_{t+1} on B_t. The formula
describes an SGLD move only; a kernel that reports its own ``acceptance`` (MALA) has it
recorded at every step instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from slt.posterior import Posterior
from slt.samplers.base import Kernel
from slt.samplers.mala import acceptance_probability, move_log_ratio

_CHECK_EVERY = 200
# The loop replays its passes from traced graphs (Posterior.replayed) for models of up to
# this many sampled parameters, where a pass is mostly per-operation overhead, tracing
# anew in runs of at least LOOP_TRACE_MIN_STEPS chain-steps (shorter ones use only graphs
# kept from earlier runs): a trace costs 0.05-0.2 s. One CPU thread, a pass eager /
# replayed: 191 / 112 µs on a 10-parameter regression, 426 / 352 µs on the 10k MLP (batch
# 128), so a trace is repaid in ~2,000 passes. The first trace in a process also imports
# torch._dynamo (~1.3 s; a torch.optim optimizer imports it too, so a process that trained
# the model has paid it), repaid in ~20,000: LOOP_TRACE_MIN_STEPS_COLD until it is imported
LOOP_TRACE_MAX_PARAMS = 100_000
LOOP_TRACE_MIN_STEPS = 2_000
LOOP_TRACE_MIN_STEPS_COLD = 20_000


class DivergenceError(RuntimeError):
    """Every chain produced a non-finite loss."""


@dataclass(frozen=True)
class Trace:
    """Per-draw records of a run. Arrays are ``(chain, draw)`` over all steps, burn-in included.

    ``loss[c, t]`` is L_B(w_t) on chain c's t-th minibatch B, and ``loss_at_center[c, t]``
    is L_B(w*) on the same batch. ``diverged[c]`` is True if chain c produced a non-finite
    loss; ``steps_run[c]`` is how many steps it took before stopping. ``acceptance[c, t]``
    is the MALA acceptance probability of step t (the move w_t → w_{t+1}), NaN where it
    was not computed.
    """

    loss: np.ndarray  # (chain, draw)
    loss_at_center: np.ndarray  # (chain, draw)
    diverged: np.ndarray  # (chain,) bool
    steps_run: np.ndarray  # (chain,) int
    acceptance: np.ndarray | None = None  # (chain, draw) in [0, 1], NaN where not computed


@contextmanager
def flush_denormals():
    """Flush subnormal floats to zero while sampling, then restore the caller's setting.

    Tiny step sizes leave weights in flat directions at subnormal values, where CPU float
    arithmetic is 10-100x slower (measured: 20x on a 10k-parameter linear network at
    ε = 4e-6). torch has no getter for the mode, so it is read off a probe: a subnormal
    float32 times one is zero exactly when flushing is on.
    """
    was_on = bool(torch.tensor(1e-40, dtype=torch.float32).mul(1.0) == 0)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def chain_generators(seed: int, chain: int, device: torch.device):
    """(data-order generator on CPU, noise generator on ``device``) for one chain."""
    seeds = np.random.SeedSequence([seed, chain]).generate_state(2, dtype=np.uint64)
    data = torch.Generator().manual_seed(int(seeds[0]) >> 1)
    noise = torch.Generator(device=device).manual_seed(int(seeds[1]) >> 1)
    return data, noise


class _MoveAcceptance:
    """The MALA acceptance probability of a kernel's move on the batch it used.

    ``before(grad_fn)`` snapshots w_t and returns a ``grad_fn`` that records the plain
    ∇L_B(w_t) when the kernel calls it; ``after(loss, batch)``, with L_B(w_t) = ``loss``,
    evaluates L_B and ∇L_B at the kernel's new w_{t+1} and returns min(1, r) (0-d tensor).
    """

    def __init__(self, posterior: Posterior, step_size: float):
        self.posterior = posterior
        self.step_size = step_size
        self.params = list(posterior.params.values())
        self.start = [torch.empty_like(p) for p in self.params]
        self.grad = [torch.empty_like(p) for p in self.params]
        self.density = dict(
            center=list(posterior.anchor.values()),
            nbeta=posterior.nbeta,
            localization=posterior.localization,
        )

    def before(self, grad_fn):
        with torch.no_grad():
            torch._foreach_copy_(self.start, self.params)
        return partial(grad_fn, record=self.grad)

    def after(self, loss: torch.Tensor, batch) -> torch.Tensor:
        grads, new_loss = self.posterior.grad_fn(self.posterior.params, batch)
        with torch.no_grad():
            log_ratio = move_log_ratio(self.start, self.params, self.grad, grads, loss, new_loss,
                                       **self.density, step_size=self.step_size)  # fmt: skip
            return acceptance_probability(log_ratio)


def _dynamo_imported() -> bool:
    return "torch._dynamo" in sys.modules


def _replayed(posterior: Posterior, chain_steps: int, job_steps: int | None):
    """The loop's passes replayed from traced graphs, where that pays (see
    :data:`LOOP_TRACE_MAX_PARAMS`): a graph kept for later runs where the whole job is long
    enough, one for this run only where it is."""
    if posterior.num_params > LOOP_TRACE_MAX_PARAMS:
        return nullcontext()
    least = LOOP_TRACE_MIN_STEPS if _dynamo_imported() else LOOP_TRACE_MIN_STEPS_COLD
    job = max(chain_steps, job_steps or 0)
    return posterior.replayed(trace=job >= least, alone=chain_steps >= least)


def run_chains(
    posterior: Posterior,
    kernel: Kernel,
    *,
    num_chains: int,
    num_steps: int,
    seed: int,
    progress: bool = True,
    acceptance_every: int = 0,
    step_size: float | None = None,
    observe: Callable[[int, int], None] | None = None,
    job_steps: int | None = None,
) -> Trace:
    """Run ``num_chains`` chains of ``num_steps`` steps each, one after another.

    With the posterior's ``control_variate="none"`` the loss at w* is not evaluated per
    batch and ``loss_at_center`` holds L_n(w*) everywhere. With ``acceptance_every = k > 0``
    the MALA acceptance of the kernel's move at step size ``step_size`` is recorded at the
    steps t with t % k == 0 (meaningful for SGLD moves only; the caller decides). A kernel
    whose info carries ``acceptance`` has it recorded at every step. ``observe(chain, t)``,
    if given, is called before every step with the chain's parameters at w_t (in
    ``posterior.params``), e.g. to record per-sample losses; it must not change them.
    For a model of up to :data:`LOOP_TRACE_MAX_PARAMS` sampled parameters the passes are
    replayed from a traced graph (:meth:`Posterior.replayed`; the same numbers), traced
    here if the run has :data:`LOOP_TRACE_MIN_STEPS` chain-steps or more
    (:data:`LOOP_TRACE_MIN_STEPS_COLD` in a process that has not imported torch._dynamo), or
    the whole job it is part of does (``job_steps``: a ladder of many short runs, whose
    later runs reuse the graph the first traced).
    """
    shape = (num_chains, num_steps)
    loss = torch.full(shape, float("nan"), device=posterior.device, dtype=torch.float64)
    skip_center = posterior.control_variate == "none"
    loss_at_center = torch.full_like(loss, posterior.init_loss if skip_center else float("nan"))
    acceptance = torch.full_like(loss, float("nan"))
    if acceptance_every and step_size is None:
        raise ValueError("run_chains: acceptance_every > 0 needs the kernel's step_size")
    probe = _MoveAcceptance(posterior, step_size) if acceptance_every else None
    diverged = np.zeros(num_chains, dtype=bool)
    steps_run = np.zeros(num_chains, dtype=np.int64)
    bar = tqdm(total=num_chains * num_steps, disable=not progress, desc="sampling", unit="step")
    with flush_denormals(), _replayed(posterior, num_chains * num_steps, job_steps):
        for chain in range(num_chains):
            data_gen, noise_gen = chain_generators(seed, chain, posterior.device)
            state = kernel.init(posterior.reset())
            batches = posterior.stream(data_gen)
            row, row_center, row_acceptance = loss[chain], loss_at_center[chain], acceptance[chain]
            for t in range(num_steps):
                if observe is not None:
                    observe(chain, t)
                batch, index = next(batches)
                center_loss, grad_fn = posterior.at_center(batch, index)
                if center_loss is not None:
                    row_center[t] = center_loss
                probing = probe is not None and t % acceptance_every == 0
                if probing:
                    grad_fn = probe.before(grad_fn)
                state, info = kernel.step(state, grad_fn, batch, noise_gen)
                del grad_fn  # and the control variate's correction it holds (a parameter set)
                row[t] = info.loss
                if info.acceptance is not None:
                    row_acceptance[t] = info.acceptance
                elif probing:
                    row_acceptance[t] = probe.after(info.loss, batch)
                if (t + 1) % _CHECK_EVERY == 0 or t + 1 == num_steps:
                    bar.update(t + 1 - steps_run[chain])
                    steps_run[chain] = t + 1
                    if not torch.isfinite(row[t]):
                        diverged[chain] = True
                        break
            bar.update(0)
            if not diverged[chain] and not bool(torch.isfinite(row).all()):
                diverged[chain] = True
    bar.close()
    return Trace(
        loss.cpu().numpy(),
        loss_at_center.cpu().numpy(),
        diverged,
        steps_run,
        acceptance.cpu().numpy(),
    )
