"""Drive a kernel over chains and draws and record a ``Trace``.

One generator per chain, seeded from ``(seed, chain)``, so a chain's draws do not depend
on how many chains run or in what order. Nothing is copied to the host inside the loop:
losses are written to preallocated tensors and checked for NaN/Inf every few hundred
steps, so a diverged chain stops early without a per-step synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from slt.posterior import Posterior
from slt.samplers.base import Kernel

_CHECK_EVERY = 200


class DivergenceError(RuntimeError):
    """Every chain produced a non-finite loss."""


@dataclass(frozen=True)
class Trace:
    """Per-draw records of a run. Arrays are ``(chain, draw)`` over all steps, burn-in included.

    ``loss[c, t]`` is L_B(w_t) on chain c's t-th minibatch B, and ``loss_at_center[c, t]``
    is L_B(w*) on the same batch. ``diverged[c]`` is True if chain c produced a non-finite
    loss; ``steps_run[c]`` is how many steps it took before stopping.
    """

    loss: np.ndarray  # (chain, draw)
    loss_at_center: np.ndarray  # (chain, draw)
    diverged: np.ndarray  # (chain,) bool
    steps_run: np.ndarray  # (chain,) int


def chain_generators(seed: int, chain: int, device: torch.device):
    """(data-order generator on CPU, noise generator on ``device``) for one chain."""
    seeds = np.random.SeedSequence([seed, chain]).generate_state(2, dtype=np.uint64)
    data = torch.Generator().manual_seed(int(seeds[0]) >> 1)
    noise = torch.Generator(device=device).manual_seed(int(seeds[1]) >> 1)
    return data, noise


def run_chains(
    posterior: Posterior,
    kernel: Kernel,
    *,
    num_chains: int,
    num_steps: int,
    seed: int,
    progress: bool = True,
) -> Trace:
    """Run ``num_chains`` chains of ``num_steps`` steps each, one after another.

    With the posterior's ``control_variate="none"`` the loss at w* is not evaluated per
    batch and ``loss_at_center`` holds L_n(w*) everywhere.
    """
    shape = (num_chains, num_steps)
    loss = torch.full(shape, float("nan"), device=posterior.device, dtype=torch.float64)
    skip_center = posterior.control_variate == "none"
    loss_at_center = torch.full_like(loss, posterior.init_loss if skip_center else float("nan"))
    diverged = np.zeros(num_chains, dtype=bool)
    steps_run = np.zeros(num_chains, dtype=np.int64)
    bar = tqdm(total=num_chains * num_steps, disable=not progress, desc="sampling", unit="step")
    for chain in range(num_chains):
        data_gen, noise_gen = chain_generators(seed, chain, posterior.device)
        state = kernel.init(posterior.reset())
        batches = posterior.batches.forever(data_gen)
        row, row_center = loss[chain], loss_at_center[chain]
        for t in range(num_steps):
            batch = next(batches)
            center_loss, grad_fn = posterior.at_center(batch)
            if center_loss is not None:
                row_center[t] = center_loss
            state, info = kernel.step(state, grad_fn, batch, noise_gen)
            row[t] = info.loss
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
    return Trace(loss.cpu().numpy(), loss_at_center.cpu().numpy(), diverged, steps_run)
