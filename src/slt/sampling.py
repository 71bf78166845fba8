"""Running the chains of an LLC estimate on a built posterior and summarising them:
:func:`build_posterior` and :func:`sample_llc`, which :func:`slt.estimate_llc`, the
calibration and the evidence estimators share; the chain method (loop or vmap) is chosen
here."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from slt import _globals
from slt.chains import DivergenceError, run_chains
from slt.data import NotOneBatch
from slt.diagnostics import above_bound, diagnose, warnings_for
from slt.posterior import Posterior
from slt.result import LLCResult
from slt.samplers import FULL_BATCH, SAMPLERS
from slt.traced import attributes_restorer
from slt.vmapped import (
    VMAP_MAX_ACTIVATIONS,
    VMAP_MAX_PARAMS,
    VMAP_SAMPLERS,
    activations,
    stacks_center,
    vmap_min_chains,
)

# Below this mean MALA acceptance of its moves, SGLD's discretization visibly biases λ̂: on
# Gaussian posteriors the acceptance cannot fall below 1/2 for a stable step, and 0.6-0.8
# already meant λ̂ several times too large; well-chosen steps give 0.95-0.99.
MIN_SGLD_ACCEPTANCE = 0.9


def _snapshot(posterior: Posterior):
    """A function that puts back the global random states (:mod:`slt._globals`) and both
    model copies' attributes and buffers, their values too, as they are now: after a probe
    of the model (``"auto"``'s count of activations, the check of the batched pass, a
    vmapped run that failed) the chains that follow draw what they would have drawn
    without it (an always-on dropout, a buffer a forward updates), so ``"auto"`` that runs
    the loop runs ``"loop"``."""
    rng = _globals.current()
    modules = [m for copy in (posterior.module, posterior.reference) for m in copy.modules()]
    attributes = attributes_restorer(modules)
    values = [(b, b.detach().clone()) for m in modules for b in m._buffers.values()
              if b is not None]  # fmt: skip

    def restore() -> None:
        _globals.restore(rng)
        attributes()
        with torch.no_grad():
            for buffer, value in values:
                buffer.copy_(value)

    return restore


@contextmanager
def _untouched(posterior: Posterior):
    """Runs the block as if it had not run (:func:`_snapshot`)."""
    restore = _snapshot(posterior)
    try:
        yield
    finally:
        restore()


def sgnht_period(step_size: float) -> float:
    """Steps per oscillation of SGNHT's thermostat (α ← α + vᵀv/d - η, linearized):
    2π/√(2η); 444 at η = 1e-4."""
    return 2 * math.pi / math.sqrt(2 * step_size)


def sgnht_burnin(step_size: float) -> int:
    """The burn-in SGNHT needs from a cold start (v = 0 at w*): 2.5 thermostat periods.
    Measured on the exact quadratic of zoo.regular(4) (η = 1e-4, diffusion 0.01, averaged
    over 2,000 chains): λ̂ overshoots ~35% at steps 200-300, undershoots 6% at 500-700 and
    settles by ~1,000 (burn-in 250: +3.3%; 1,000: -0.2%)."""
    return math.ceil(2.5 * sgnht_period(step_size))


def _epochs(posterior: Posterior, num_burnin: int) -> tuple[int, int] | None:
    """(steps an epoch, the first draw of a whole one) where plain SGLD's minibatch noise
    cancels over each epoch: no control variate, and batches of one size that partition a
    TensorDataset (the fast path); each chain's epochs start at step 0. Else None."""
    stream = posterior.batches
    if (posterior.control_variate != "none" or posterior.full_data is not None
            or stream.tensors is None):  # fmt: skip
        return None
    n, size = stream.tensors[0].shape[0], stream.loader.batch_size
    if not size or n % size:
        return None
    steps = n // size
    return steps, -num_burnin % steps


def _run_vmap(posterior, sampler, step_size, num_chains, num_steps, seed, progress, compile,
              acceptance_every, num_burnin):  # fmt: skip
    from slt.vmapped import check_batched_gradient, run_chains_vmap, stacked

    with _untouched(posterior):
        check_batched_gradient(posterior)  # under "auto", a model that fails it runs the loop
    stepper = None
    if compile:
        from slt.compiled import compiled_step

        stepper = compiled_step(posterior, sampler, step_size, num_chains,
                                adapt_steps=_adapt_steps(sampler, num_burnin))  # fmt: skip

    kernel = SAMPLERS[sampler](
        step_size=step_size,
        nbeta=posterior.nbeta,
        localization=posterior.localization,
        center=stacked(posterior.anchor, num_chains),
        **_kernel_options(sampler, num_burnin),
    )
    return run_chains_vmap(posterior, kernel, num_chains=num_chains, num_steps=num_steps,
                           seed=seed, progress=progress, stepper=stepper,
                           acceptance_every=acceptance_every, step_size=step_size)  # fmt: skip


def _adapt_steps(sampler: str, num_burnin: int) -> int | None:
    """RMSprop-SGLD's preconditioner adapts over the burn-in and is then held (its draws are
    then exact Langevin; see :mod:`slt.samplers.rmsprop_sgld`); without a burn-in it adapts
    throughout, as devinterp's does."""
    return num_burnin if sampler == "rmsprop_sgld" and num_burnin > 0 else None


def _kernel_options(sampler: str, num_burnin: int) -> dict:
    return {"adapt_steps": _adapt_steps(sampler, num_burnin)} if sampler == "rmsprop_sgld" else {}


def build_posterior(
    model,
    loader,
    loss_fn,
    *,
    n,
    nbeta,
    localization,
    control_variate,
    sampler,
    prior_mean=None,
    params=None,
    microbatch=None,
    seed=0,
) -> Posterior:
    """The :class:`Posterior` an estimate with ``sampler`` needs (full batch for MALA)."""
    try:
        return Posterior(
            model,
            loader,
            loss_fn,
            n=n,
            nbeta=nbeta,
            localization=localization,
            control_variate=control_variate,
            full_batch=sampler in FULL_BATCH,
            prior_mean=prior_mean,
            params=params,
            microbatch=microbatch,
            seed=seed,
        )
    except NotOneBatch as err:
        raise ValueError(
            f"sampler={sampler!r} needs the whole dataset as one batch at every step, but the "
            f"{err}; pass a DataLoader over a TensorDataset (its full tensors are used, "
            "whatever the batch size) or a loader with batch_size >= len(dataset)"
        ) from None


def _small_activations(posterior: Posterior, num_chains: int, seed: int) -> bool:
    """Whether the batched pass of ``num_chains`` chains keeps at most
    :data:`slt.vmapped.VMAP_MAX_ACTIVATIONS` numbers of activations (measured on the first
    batch the chains would see)."""
    rows = num_chains * (2 if stacks_center(posterior) else 1)  # w* as C more rows?
    try:
        batch = next(iter(posterior.batches.epoch(torch.Generator().manual_seed(seed))))
        with _untouched(posterior):
            return rows * activations(posterior, batch) <= VMAP_MAX_ACTIVATIONS
    except Exception:  # a model the hooks or this batch cannot run: vmap decides as before
        return True


def sample_llc(
    posterior: Posterior,
    *,
    sampler: str,
    step_size: float,
    num_chains: int,
    num_draws: int,
    num_burnin: int,
    seed: int,
    progress: bool = False,
    acceptance_every: int = 20,
    nbeta_default: bool = False,
    calibration: dict | None = None,
    start: float | None = None,
    record_every: int = 0,
    record_path: str | None = None,
    chain_method: str = "loop",
    compile: bool = False,
) -> LLCResult:
    """Run the chains on a built ``posterior`` and summarise them (arguments checked by
    :func:`slt.estimate_llc`). Afterwards ``posterior.params`` hold the last chain's final draw."""
    start = time.perf_counter() if start is None else start
    control_variate = posterior.control_variate
    kernel = SAMPLERS[sampler](
        step_size=step_size,
        nbeta=posterior.nbeta,
        localization=posterior.localization,
        center=posterior.anchor,
        **_kernel_options(sampler, num_burnin),
    )
    probe_every = acceptance_every if sampler == "sgld" else 0
    vmappable = sampler in VMAP_SAMPLERS and not record_every
    if chain_method == "vmap" and not vmappable:
        raise ValueError(
            f'chain_method="vmap" supports samplers {VMAP_SAMPLERS} with record="loss"; got '
            f"sampler={sampler!r}" + (', record="per_sample"' if record_every else "")
        )
    recorder = None
    if record_every:  # after the checks: it creates the file
        from slt.record import PerSampleRecorder

        recorder = PerSampleRecorder(posterior, num_chains=num_chains, start=num_burnin,
                                     every=record_every, path=record_path,
                                     num_draws=num_draws)  # fmt: skip
    trace = None
    auto_vmap = (
        chain_method == "auto"
        and vmappable
        and num_chains >= vmap_min_chains(posterior.module, num_burnin + num_draws)
        and posterior.num_params <= VMAP_MAX_PARAMS
        and _small_activations(posterior, num_chains, seed)
    )
    if chain_method == "vmap" or auto_vmap:
        restore = _snapshot(posterior) if auto_vmap else None  # the loop may follow
        try:
            trace = _run_vmap(posterior, sampler, step_size, num_chains, num_burnin + num_draws,
                              seed, progress, compile, probe_every, num_burnin)  # fmt: skip
        except Exception:
            if chain_method == "vmap":
                raise
            restore()
            trace = None  # the model cannot be vmapped: run the loop
    ran = "loop" if trace is None else "vmap"
    if trace is None:
        try:
            trace = run_chains(
                posterior,
                kernel,
                num_chains=num_chains,
                num_steps=num_burnin + num_draws,
                seed=seed,
                progress=progress,
                acceptance_every=probe_every,
                step_size=step_size,
                observe=recorder,
            )
        except BaseException:
            if recorder is not None:
                recorder.close(keep=False)  # a file already at record_path stays as it was
            raise
    loss = trace.loss[:, num_burnin:]
    at_center = trace.loss_at_center[:, num_burnin:]
    per_chain = posterior.nbeta * (loss - at_center).mean(axis=1)
    per_chain[trace.diverged] = np.nan
    notes = list(posterior.warnings)
    ok = ~trace.diverged
    if recorder is not None:
        recorder.close(keep=bool(ok.any()))
    if not ok.any():
        raise DivergenceError(
            f"all {num_chains} chains diverged (non-finite loss) with step_size={step_size:g}; "
            "try a step size 3-10x smaller, or a larger localization"
        )
    acceptance = trace.acceptance[:, num_burnin:]
    computed = acceptance[ok][np.isfinite(acceptance[ok])]
    good = per_chain[ok]
    llc_std = float(good.std(ddof=1) / math.sqrt(good.size)) if good.size > 1 else math.nan
    diag = diagnose(posterior.nbeta * (loss - at_center), diverged=trace.diverged,
                    nbeta=posterior.nbeta, epoch=_epochs(posterior, num_burnin))  # fmt: skip
    bound = above_bound(per_chain, diag.llc, diag.mcse, posterior.num_params)
    mala_acceptance = float(computed.mean()) if computed.size else math.nan
    too_large = bool(bound) or (sampler == "sgld" and mala_acceptance < MIN_SGLD_ACCEPTANCE)
    notes += warnings_for(diag, step_too_large=too_large)
    notes += bound
    if sampler == "sgnht" and num_burnin < sgnht_burnin(step_size):
        notes.append(
            f"num_burnin={num_burnin} is short for SGNHT at step_size={step_size:g}: its "
            f"thermostat oscillates with a period of ~{sgnht_period(step_size):.0f} steps "
            "(2π/√(2η)) and every chain starts it alike, so the draws carry a common "
            "transient that no error bar covers (zoo.regular(4): λ̂ +3.7% at 250 steps, +44% "
            f"with control_variate='none'); use num_burnin >= {sgnht_burnin(step_size)}"
        )
    if probe_every and not computed.size:
        notes.append(
            f"no MALA-acceptance probe fell among the {num_draws} draws of a usable chain "
            f"(acceptance_every={acceptance_every}): whether step_size={step_size:g} is small "
            f"enough for an unbiased λ̂ went unchecked; use acceptance_every <= {num_draws}"
        )
    if sampler == "sgld" and mala_acceptance < MIN_SGLD_ACCEPTANCE:
        notes.append(
            f"SGLD moves would have MALA acceptance {mala_acceptance:.2f} "
            f"(< {MIN_SGLD_ACCEPTANCE}): step_size={step_size:g} is too large for an unbiased "
            "λ̂ (SGLD inflates the posterior's spread); use a smaller step size or "
            'step_size="auto"'
        )
    if sampler == "mala" and mala_acceptance < 0.2:
        notes.append(
            f"MALA accepted only {mala_acceptance:.0%} of its proposals: the chains barely "
            "move and λ̂ is biased toward 0; use a smaller step size"
        )
    if calibration is not None:
        notes += [f"calibration: {w}" for w in calibration["warnings"]]
    return LLCResult(
        llc=float(good.mean()),
        llc_std=llc_std,
        llc_per_chain=per_chain,
        init_loss=posterior.init_loss,
        trace=loss,
        trace_at_center=at_center,
        diverged=trace.diverged,
        warnings=tuple(notes),
        nbeta=posterior.nbeta,
        nbeta_default=nbeta_default,
        n=posterior.n,
        num_params=posterior.num_params,
        localization=posterior.localization,
        step_size=step_size,
        sampler=sampler,
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin=num_burnin,
        control_variate=control_variate,
        seed=seed,
        seconds=time.perf_counter() - start,
        chain_method=ran,
        compiled=compile and ran == "vmap",
        microbatch=posterior.microbatch,
        params=posterior.selection,
        acceptance=acceptance,
        mala_acceptance=mala_acceptance,
        acceptance_every=acceptance_every,
        rhat=diag.rhat,
        ess_bulk=diag.ess_bulk,
        ess_tail=diag.ess_tail,
        mcse=diag.mcse,
        calibration=calibration,
        per_sample_path=None if recorder is None else os.path.abspath(record_path),
    )
