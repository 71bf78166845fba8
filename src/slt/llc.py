"""The local learning coefficient λ̂(w*) by SGLD-family sampling.

λ̂ = nβ (E_w[L_n(w)] - L_n(w*)), the expectation under the localized tempered posterior
∝ exp(-nβ L_n(w) - (γ/2)‖w - w*‖²) (Lau, Furman, Wang, Murfet & Wei 2023,
arXiv 2308.12108, eq. 6 and Def. 3). L_n(w) is estimated on each draw's minibatch B; with
the control variate (default) we subtract L_B(w*) on the *same* batch, which has mean
L_n(w*) and removes most of the minibatch noise:

    λ̂ = nβ · mean_t [L_{B_t}(w_t) - L_{B_t}(w*)]

B_t is drawn independently of w_t, so this is unbiased for the same quantity.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from slt import _checks
from slt.chains import DivergenceError, run_chains
from slt.data import NotOneBatch
from slt.diagnostics import diagnose, warnings_for
from slt.losses import LossFn
from slt.posterior import CONTROL_VARIATES, ControlVariate, Posterior
from slt.samplers import FULL_BATCH, SAMPLERS
from slt.vmapped import VMAP_MAX_PARAMS, VMAP_MIN_CHAINS, VMAP_SAMPLERS

# Below this mean MALA acceptance of its moves, SGLD's discretization visibly biases λ̂: on
# Gaussian posteriors the acceptance cannot fall below 1/2 for a stable step, and 0.6-0.8
# already meant λ̂ several times too large; well-chosen steps give 0.95-0.99.
MIN_SGLD_ACCEPTANCE = 0.9


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate with what is needed to judge it. Arrays are ``(chain, draw)``."""

    llc: float  # mean of llc_per_chain over chains that did not diverge
    llc_std: float  # standard error of that mean (std over chains / √chains)
    llc_per_chain: np.ndarray  # (chain,), NaN for diverged chains
    init_loss: float  # L_n(w*) on the full data
    trace: np.ndarray  # (chain, draw) minibatch loss L_B(w_t) after burn-in
    trace_at_center: np.ndarray  # (chain, draw) L_B(w*) on the same batches
    diverged: np.ndarray  # (chain,) bool
    warnings: tuple[str, ...]
    nbeta: float
    nbeta_default: bool
    n: int
    num_params: int
    localization: float
    step_size: float
    sampler: str
    num_chains: int
    num_draws: int
    num_burnin: int
    control_variate: str
    seed: int
    seconds: float
    # MALA acceptance probability of each post-burn-in step (the move w_t → w_{t+1}): every
    # step for sampler="mala", every `acceptance_every` steps for "sgld" (the acceptance its
    # move would have had under MALA), NaN where not computed and for the other samplers.
    acceptance: np.ndarray | None = None  # (chain, draw)
    mala_acceptance: float = math.nan  # mean of the computed values over non-diverged chains
    acceptance_every: int = 0
    # Diagnostics of the per-draw λ̂ trace over usable chains (slt.diagnostics).
    rhat: float = math.nan  # rank-normalized split R̂; NaN with one usable chain
    ess_bulk: float = math.nan  # bulk ESS, total over usable chains
    ess_tail: float = math.nan  # tail ESS (5%/95% quantiles), total
    mcse: float = math.nan  # Monte Carlo standard error of llc, sd/√ESS (minibatch noise included)
    calibration: dict | None = None  # what step_size="auto" tried and chose (CalibrationResult)
    per_sample_path: str | None = None  # HDF5 file of per-sample losses (record="per_sample")

    @property
    def llc_trace(self) -> np.ndarray:
        """(chain, draw) per-draw λ̂ = nβ (L_B(w_t) - L_B(w*))."""
        return self.nbeta * (self.trace - self.trace_at_center)

    def to_dict(self) -> dict:
        """Plain Python numbers and lists (JSON-serialisable)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out

    def save(self, path) -> None:
        """Write to a netCDF file in ArviZ's layout (:func:`slt.io.save`; ``slt[io]``)."""
        from slt.io import save

        save(self, path)

    def _acceptance_note(self) -> str:
        if self.sampler == "mala":
            return f"{self.mala_acceptance:.3g} (every step)"
        if self.sampler != "sgld":
            return f"n/a (not defined for {self.sampler} moves)"
        if math.isnan(self.mala_acceptance):
            return f"n/a (acceptance_every={self.acceptance_every})"
        return f"{self.mala_acceptance:.3g} of SGLD moves (every {self.acceptance_every} steps)"

    def __str__(self) -> str:
        ok = ~self.diverged
        nb = f"{self.nbeta:.4g}" + (" (default n/log n)" if self.nbeta_default else "")
        per_chain = " ".join(
            "diverged" if d else f"{v:.4g}" for v, d in zip(self.llc_per_chain, self.diverged)
        )
        lines = [
            f"LLC estimate  λ̂ = {self.llc:.4g} ± {self.llc_std:.2g}  "
            f"({int(ok.sum())}/{self.num_chains} chains × {self.num_draws} draws, "
            f"burn-in {self.num_burnin})",
            f"  sampler {self.sampler}, step_size {self.step_size:g}, "
            f"localization {self.localization:g}, nβ {nb}, n {self.n}",
            f"  L_n(w*) {self.init_loss:.6g}   d {self.num_params} "
            f"(BIC's d/2 = {self.num_params / 2:g})   "
            f"control variate {self.control_variate}   {self.seconds:.1f} s",
            f"  per chain: {per_chain}",
            f"  R̂ {self.rhat:.3f}   ESS bulk {self.ess_bulk:.0f} tail {self.ess_tail:.0f}   "
            f"MCSE {self.mcse:.2g}   MALA acceptance {self._acceptance_note()}",
        ]
        if self.calibration is not None:
            cal = self.calibration
            lines.append(
                f"  step_size chosen by calibration: {cal['step_size']:.3g} from "
                f"{len(cal['candidates'])} candidates in {cal['seconds']:.1f} s"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def estimate_llc(
    model,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    nbeta: float | None = None,
    localization: float = 1.0,
    step_size: float | str = 1e-4,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_burnin: int = 250,
    sampler: str = "sgld",
    control_variate: ControlVariate = "gradient",
    seed: int = 0,
    progress: bool = True,
    acceptance_every: int = 20,
    record: str = "loss",
    record_every: int = 10,
    record_path: str | None = None,
    params=None,
    chain_method: str = "auto",
    compile: bool = False,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current parameters w*.

    λ̂ = nβ · mean_t [L_{B_t}(w_t) - L_{B_t}(w*)] over post-burn-in draws w_t of the
    localized tempered posterior ∝ exp(-nβ L_n(w) - (γ/2)‖w - w*‖²) (Lau et al. 2023,
    arXiv 2308.12108). The standard error is over chains.

    Parameters
    ----------
    model : torch.nn.Module
        The model at w*; never modified (sampling runs on private copies in eval mode).
    loader : re-iterable of batches, e.g. a ``DataLoader``
    loss_fn : callable ``(model, batch) -> Tensor``
        The batch *mean per-sample negative log-likelihood*; see :func:`slt.supervised`
        and :func:`slt.gaussian_nll`. A loss that is c × NLL acts like temperature c·nβ.
    n : int, optional
        Sample size behind L_n; defaults to ``len(loader.dataset)``.
    nbeta : float, optional
        nβ; defaults to n / log n (β* = 1/log n, the WBIC temperature).
    localization : float
        γ, the strength of the pull toward w*.
    step_size : float or "auto"
        ε of the SGLD step Δw = (ε/2)(-nβ∇L_B - γ(w - w*)) + N(0, ε). "auto" first runs
        :func:`slt.calibrate` with short pilot chains (one per candidate, within a budget
        of a fifth of this estimate's steps, with this call's nβ, γ, sampler and control
        variate) and uses the step size it picks; the result's ``calibration`` records
        every candidate and why.
    num_chains, num_draws, num_burnin : int
        Each chain takes ``num_burnin + num_draws`` steps; burn-in draws are discarded.
    sampler : {"sgld", "rmsprop_sgld", "sgnht", "mala"}
        "sgld" (Welling & Teh 2011), "rmsprop_sgld" (pSGLD, Li et al. 2016), "sgnht"
        (thermostat, Ding et al. 2014; ``step_size`` is its learning rate η) or "mala"
        (Metropolis-adjusted Langevin, Roberts & Tweedie 1996: exact for any step size, up
        to Monte Carlo error). MALA's accept test needs the target at two points on one
        batch, so every MALA step uses the whole dataset as one batch: the full tensors
        of a ``DataLoader`` over a ``TensorDataset``, or the single batch of a loader that
        yields one per epoch (any other loader raises ``ValueError``). Each step then
        costs a full pass, and the control variate is set to "none": with the full batch
        L_B(w*) = L_n(w*) exactly and the gradient correction would be zero, so the extra
        forward and backward pass at w* would be wasted.
    control_variate : {"gradient", "loss", "none"}
        "gradient" (default): use ∇L_B(w) - ∇L_B(w*) + ∇L_n(w*) as the gradient, which
        removes most of the minibatch gradient noise near w* and the upward bias it causes
        in λ̂ (measured: +5% to +13% on small deep linear networks at ε = 5e-5, b = 128),
        and subtract L_B(w*) from each draw's loss. Costs a forward and a backward pass at
        w* per step (about 1.5x plain SGLD) and one full-data gradient at the start.
        "loss": only subtract L_B(w*) (one extra forward pass per step); this cuts the
        spread of the per-draw λ̂, and the standard error where minibatch noise dominates
        it. "none": plain SGLD, λ̂ = nβ (mean_t L_{B_t}(w_t) - L_n(w*)).
    seed : int
        Chains are seeded from ``(seed, chain)``: the same seed gives the same numbers.
    progress : bool
        Show a progress bar.
    acceptance_every : int
        For ``sampler="sgld"``, every this many steps record the Metropolis-Hastings
        acceptance probability the SGLD move w_t → w_{t+1} would have had as a MALA
        proposal on the same minibatch, with U(w) = nβ L_B(w) + (γ/2)‖w - w*‖² and its
        plain minibatch gradient at both ends (Furman & Lau 2024, arXiv 2402.03698, as a
        check of the step size: near 1 means the discretization is accurate, well below
        1 that ε is too large). One extra forward and backward pass per check; 0 turns it
        off. "mala" records its own acceptance at every step; for "rmsprop_sgld" and
        "sgnht" the plain MALA formula does not describe the move (a preconditioned or
        momentum step) and nothing is recorded (NaN). Reading it: near 1 is good. On a
        Gaussian posterior, full-batch SGLD is a reversible Gaussian chain, so
        log r = log f(w_{t+1}) - log f(w_t) with f = p / (SGLD's stationary law) is
        symmetric about 0 at stationarity and the mean acceptance stays above 1/2 for
        any stable ε (measured: 0.69 at 90% of the stability limit, where λ̂ was 6x too
        large). Values below 1/2 need a non-Gaussian posterior (a small deep linear
        network at 75% of its stability limit at w*: 0.35-0.38).

    record : {"loss", "per_sample"}
        "per_sample" also evaluates the per-sample NLL of every sample at every
        ``record_every``-th post-burn-in step (a full pass over the data each time, in a
        fixed order) and streams the rows to the HDF5 file ``record_path`` as the dataset
        ``per_sample_loss`` (chain, draw, sample); memory stays O(n). Needs ``slt[io]``.
    record_every, record_path : int, str
        See ``record``.
    chain_method : {"auto", "loop", "vmap"}
        "loop" runs the chains one after another; "vmap" steps all chains at once with
        ``torch.func.vmap`` (same batches and noise per chain, equal to the loop up to
        rounding, the MALA acceptance of SGLD moves included; "sgld" and "rmsprop_sgld"
        only, without per-sample recording). "auto" takes "vmap" where it applies —
        ``record="loss"``, 4 or more chains — and falls back to the loop if the model cannot
        be vmapped (data-dependent control flow, random layers), and for more than 100,000
        sampled parameters, where vmap stops paying (0.9x at 241k, 0.5x at 1M on CPU).
        Measured on 2 CPU cores
        with the defaults (benchmarks/bench_vmap.py): 1.3-1.6x faster per chain-step at 4
        chains, 1.9-2.7x at 8, 2.4-4.4x at 16, on models of 10 to 10,400 parameters.
    compile : bool
        With ``chain_method="vmap"``, run the batched step under ``torch.compile``
        (:mod:`slt.compiled`; equal to the eager step up to rounding). The first estimate
        on a model shape pays seconds of compilation; later ones in the process (the next
        training checkpoint, another step size) reuse it. Measured on one CPU thread:
        1.1-7x fewer µs per chain-step, after 2-18 s of compilation.
    params : str, list of str, or callable, optional
        Sample only the parameters whose names match (exact names or glob patterns such
        as ``"layers.0.*"``, or a predicate ``(name, parameter) -> bool``) and hold the
        others at w*: the weight-refined LLC of that part of the network (Wang, Hoogland,
        van Wingerden, Furman & Murfet 2024, arXiv 2410.02984). A loader over a subset of
        the data gives the data-refined LLC (pass ``n`` if it should differ from the
        subset's size). ``num_params`` then counts the sampled parameters only.

    Examples
    --------
    >>> import torch, slt
    >>> x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    >>> data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-1.0]]))
    >>> loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> res = slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), num_draws=200,
    ...                        num_burnin=50, progress=False)
    >>> 0.5 < res.llc < 1.5   # d/2 = 1 for this regular model
    True
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    auto = isinstance(step_size, str) and step_size == "auto"
    if not auto:
        step_size = _checks.real("step_size", step_size, minimum=0, strict=True)
    num_chains = _checks.integer("num_chains", num_chains, minimum=1)
    num_draws = _checks.integer("num_draws", num_draws, minimum=1)
    num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    seed = _checks.integer("seed", seed, minimum=0)
    acceptance_every = _checks.integer("acceptance_every", acceptance_every, minimum=0)
    if chain_method not in ("auto", "loop", "vmap"):
        raise ValueError(f'chain_method must be "auto", "loop" or "vmap", got {chain_method!r}')
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and chain_method != "vmap":
        raise ValueError(
            f'compile=True needs chain_method="vmap", got chain_method={chain_method!r}'
        )
    if record not in ("loss", "per_sample"):
        raise ValueError(f'record must be "loss" or "per_sample", got {record!r}')
    record_every = _checks.integer("record_every", record_every, minimum=1)
    if record == "per_sample" and record_path is None:
        raise ValueError('record="per_sample" streams to a file: pass record_path="....h5"')
    full_batch = sampler in FULL_BATCH
    if full_batch and control_variate in CONTROL_VARIATES:
        control_variate = "none"  # the full batch makes both control variates moot
    calibration = None
    if auto:
        from slt.calibrate import calibrate

        budget = num_chains * (num_burnin + num_draws) // 5
        cal = calibrate(
            model, loader, loss_fn, n=n, nbeta=nbeta, localization=localization,
            sampler=sampler, control_variate=control_variate, max_pilot_steps=budget,
            params=params, seed=seed, progress=progress,
        )  # fmt: skip
        step_size, calibration = cal.step_size, cal.to_dict()
    start = time.perf_counter()
    posterior = build_posterior(
        model, loader, loss_fn, n=n, nbeta=nbeta, localization=localization,
        control_variate=control_variate, sampler=sampler, params=params,
    )  # fmt: skip
    for message in posterior.warnings:  # e.g. a train-mode model: point at the caller
        warnings.warn(message, UserWarning, stacklevel=2)
    return sample_llc(
        posterior, sampler=sampler, step_size=step_size, num_chains=num_chains,
        num_draws=num_draws, num_burnin=num_burnin, seed=seed, progress=progress,
        acceptance_every=acceptance_every, nbeta_default=nbeta is None,
        calibration=calibration, start=start,
        record_every=record_every if record == "per_sample" else 0, record_path=record_path,
        chain_method=chain_method, compile=compile,
    )  # fmt: skip


def _run_vmap(posterior, sampler, step_size, num_chains, num_steps, seed, progress, compile,
              acceptance_every):  # fmt: skip
    from slt.vmapped import run_chains_vmap, stacked

    stepper = None
    if compile:
        from slt.compiled import compiled_step

        stepper = compiled_step(posterior, sampler, step_size, num_chains)

    kernel = SAMPLERS[sampler](
        step_size=step_size,
        nbeta=posterior.nbeta,
        localization=posterior.localization,
        center=stacked(posterior.anchor, num_chains),
    )
    return run_chains_vmap(posterior, kernel, num_chains=num_chains, num_steps=num_steps,
                           seed=seed, progress=progress, stepper=stepper,
                           acceptance_every=acceptance_every, step_size=step_size)  # fmt: skip


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
        )
    except NotOneBatch as err:
        raise ValueError(
            f"sampler={sampler!r} needs the whole dataset as one batch at every step, but the "
            f"{err}; pass a DataLoader over a TensorDataset (its full tensors are used, "
            "whatever the batch size) or a loader with batch_size >= len(dataset)"
        ) from None


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
    :func:`estimate_llc`). Afterwards ``posterior.params`` hold the last chain's final draw."""
    start = time.perf_counter() if start is None else start
    control_variate = posterior.control_variate
    recorder = None
    if record_every:
        from slt.record import PerSampleRecorder

        recorder = PerSampleRecorder(posterior, num_chains=num_chains, start=num_burnin,
                                     every=record_every, path=record_path,
                                     num_draws=num_draws)  # fmt: skip
    kernel = SAMPLERS[sampler](
        step_size=step_size,
        nbeta=posterior.nbeta,
        localization=posterior.localization,
        center=posterior.anchor,
    )
    probe_every = acceptance_every if sampler == "sgld" else 0
    vmappable = sampler in VMAP_SAMPLERS and not record_every and not (compile and probe_every)
    if chain_method == "vmap" and not vmappable:
        raise ValueError(
            f'chain_method="vmap" supports samplers {VMAP_SAMPLERS} with record="loss" (and '
            f"acceptance_every=0 when compiled); got sampler={sampler!r}, "
            f"acceptance_every={acceptance_every}, compile={compile}"
        )
    trace = None
    auto_vmap = (
        chain_method == "auto"
        and vmappable
        and num_chains >= VMAP_MIN_CHAINS
        and posterior.num_params <= VMAP_MAX_PARAMS
    )
    if chain_method == "vmap" or auto_vmap:
        try:
            trace = _run_vmap(posterior, sampler, step_size, num_chains, num_burnin + num_draws,
                              seed, progress, compile, probe_every)  # fmt: skip
        except Exception:
            if chain_method == "vmap":
                raise
            trace = None  # the model cannot be vmapped: run the loop
    if trace is None:
        try:
            trace = run_chains(
                posterior,
                kernel,
                num_chains=num_chains,
                num_steps=num_burnin + num_draws,
                seed=seed,
                progress=progress,
                acceptance_every=acceptance_every if sampler == "sgld" else 0,
                step_size=step_size,
                observe=recorder,
            )
        finally:
            if recorder is not None:
                recorder.close()
    loss = trace.loss[:, num_burnin:]
    at_center = trace.loss_at_center[:, num_burnin:]
    per_chain = posterior.nbeta * (loss - at_center).mean(axis=1)
    per_chain[trace.diverged] = np.nan
    notes = list(posterior.warnings)
    ok = ~trace.diverged
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
                    nbeta=posterior.nbeta)  # fmt: skip
    notes += warnings_for(diag)
    mala_acceptance = float(computed.mean()) if computed.size else math.nan
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
        acceptance=acceptance,
        mala_acceptance=mala_acceptance,
        acceptance_every=acceptance_every,
        rhat=diag.rhat,
        ess_bulk=diag.ess_bulk,
        ess_tail=diag.ess_tail,
        mcse=diag.mcse,
        calibration=calibration,
        per_sample_path=None if recorder is None else str(record_path),
    )
