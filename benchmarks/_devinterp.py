"""devinterp 2.0.1 driven on a benchmark case: ``llc()``, ``sample_single_chain`` and the
plain loop around its ``SGMCMC.sgld`` optimizer (README.md here says how and why).

devinterp is imported inside each driver, so importing this module costs nothing.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import Run, full_loss, minibatches, per_chain_llc


class RowIds(torch.utils.data.Dataset):
    """Sample i as the two-"token" sequence [i, i]: devinterp's pipeline wants LM-shaped
    ``{"input_ids": (seq,)}`` rows and a per-token loss ``(batch, seq - 1)``, so with seq = 2
    each sample is one "token position" whose loss is that sample's NLL."""

    def __init__(self, n: int):
        self.ids = torch.arange(n).repeat_interleave(2).view(n, 2)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def gaussian_nll_per_sample(case):
    """``(model, input_ids) -> (batch, 1)`` per-sample NLL of the case's σ = 1 Gaussian model
    (whose batch mean is ``case.loss_fn``; checked in :func:`check_per_sample_loss`)."""
    x, y = case.dataset.tensors
    const = 0.5 * math.log(2 * math.pi)

    def loss_fn(model, input_ids):
        rows = input_ids[:, 0]
        residual = (model(x[rows]) - y[rows]).reshape(rows.shape[0], -1)
        return (0.5 * residual.square().sum(1) + residual.shape[1] * const)[:, None]

    return loss_fn


def check_per_sample_loss(case) -> None:
    ids = RowIds(case.n).ids
    with torch.no_grad():
        mine = float(gaussian_nll_per_sample(case)(case.model, ids).mean())
    if not math.isclose(mine, full_loss(case, case.model), rel_tol=1e-5):
        raise RuntimeError(f"{case.name}: per-sample NLL does not average to case.loss_fn")


def run_devinterp_llc(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """devinterp 2's top-level ``devinterp.slt.llc.llc`` (sample() to zarr, then compute_llc).

    Its own ``llc_per_chain`` averages over the burn-in steps too; for a like-for-like λ̂
    we recompute it from the post-burn-in part of the ``loss_trace`` and the ``init_loss``
    that ``llc()`` returns (the same formula, nβ (mean loss - init loss))."""
    from devinterp.slt.llc import llc

    with tempfile.TemporaryDirectory() as tmp:
        res = llc(
            model=case.model,
            dataset=RowIds(case.n),
            observables={},
            lr=run.step_size,
            n_beta=nbeta,
            localization=run.localization,
            num_chains=run.num_chains,
            num_draws=run.num_draws,
            num_burnin_steps=run.num_burnin,
            batch_size=run.batch_size,
            init_seed=seed * 1000,
            match_sampling_input_ids_across_chains=False,
            output_path=Path(tmp) / "samples.zarr",
            loss_fn=gaussian_nll_per_sample(case),
            # llc() picks CUDA whenever it is there; slt runs on the model's device (the CPU
            # here), and the row ids index CPU tensors: the same device for both, as the
            # other devinterp rows pin it
            device=str(next(case.model.parameters()).device),
        )
        trace = torch.as_tensor(res["loss_trace"].values[:, run.num_burnin :])
        return per_chain_llc(trace, float(res["init_loss"]), nbeta)


def run_devinterp_chain(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """devinterp's chain runner ``sample_single_chain`` (what ``sample()`` calls per chain)
    with a custom ``evaluate`` -- its README's route for "more exotic control" -- minus the
    zarr writing; the draw losses go to a tensor through its ``callbacks``."""
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    init_loss = full_loss(case, case.model)  # sample() computes this before the chains
    loss_fn = gaussian_nll_per_sample(case)
    losses = torch.empty(run.num_chains, run.num_draws)

    def evaluate(model, data):
        return loss_fn(model, data["input_ids"]), {}

    for chain in range(run.num_chains):

        def record(*, loss, draw, chain=chain, **_):
            losses[chain, draw] = loss.mean()

        sample_single_chain(
            ref_model=case.model,
            dataset=RowIds(case.n),
            evaluate=evaluate,
            param_masks={name: None for name, _ in case.model.named_parameters()},
            num_draws=run.num_draws,
            num_burnin_steps=run.num_burnin,
            num_steps_bw_draws=1,
            sampling_method=SGMCMC.sgld,
            sampling_method_kwargs=devinterp_sgld_kwargs(run, nbeta),
            chain=chain,
            seed=seed * 1000 + chain,
            dataloader_seed=seed * 1000 + chain,
            device="cpu",
            callbacks=[record],
            batch_size=run.batch_size,
            shuffle=True,
        )
    return per_chain_llc(losses, init_loss, nbeta)


def run_devinterp_loop(case, run: Run, seed: int, nbeta: float) -> np.ndarray:
    """The plain user loop around ``devinterp.optim.SGMCMC.sgld``: a model copy per chain,
    zero_grad / loss / backward / step per draw, batches sliced as for the SGD floor."""
    from devinterp.optim import SGMCMC

    init_loss = full_loss(case, case.model)
    x, y = case.dataset.tensors
    losses = torch.empty(run.num_chains, run.steps)
    for chain in range(run.num_chains):
        model = copy.deepcopy(case.model)
        opt = SGMCMC.sgld(model.parameters(), **devinterp_sgld_kwargs(run, nbeta))
        noise = torch.Generator().manual_seed(2 * (seed * 1000 + chain))
        data = torch.Generator().manual_seed(2 * (seed * 1000 + chain) + 1)
        batches = minibatches(x, y, run.batch_size, data)
        for t in range(run.steps):
            batch = next(batches)
            opt.zero_grad()
            loss = case.loss_fn(model, batch)
            loss.backward()
            opt.step(noise_generator=noise)
            losses[chain, t] = loss.detach()
    return per_chain_llc(losses[:, run.num_burnin :], init_loss, nbeta)


def devinterp_sgld_kwargs(run: Run, nbeta: float) -> dict:
    """SGMCMC.sgld: Δw = (lr/2)(-nbeta ∇L_B - localization (w - w0)) + √lr N(0, noise_level²),
    so lr = ε, nbeta = nβ, localization = γ, noise_level = 1 is our SGLD step exactly.
    The remaining keys are the values ``devinterp.slt.sampling.sample`` passes."""
    return dict(
        lr=run.step_size,
        nbeta=nbeta,
        localization=run.localization,
        noise_level=1.0,
        weight_decay=0.0,
        bounding_box_size=None,
        save_metrics=False,
    )
