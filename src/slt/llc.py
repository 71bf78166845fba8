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

import os
import time
import warnings
from collections.abc import Iterable

from slt import _checks, _globals
from slt.losses import LossFn
from slt.posterior import CONTROL_VARIATES, ControlVariate
from slt.result import LLCResult
from slt.samplers import FULL_BATCH, SAMPLERS
from slt.sampling import build_posterior, sample_llc

__all__ = ["LLCResult", "estimate_llc"]


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
    microbatch: int | str | None = "auto",
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
        Sample size behind L_n; defaults to the samples one pass over the loader yields,
        which L_n(w*) is taken over (``len(loader.dataset)`` for a plain loader, the subset
        for a ``SubsetRandomSampler``; a short last batch counts even with ``drop_last``).
    nbeta : float, optional
        nβ; defaults to n / log n (β* = 1/log n, the WBIC temperature).
    localization : float
        γ, the strength of the pull toward w*.
    step_size : float or "auto"
        ε of the SGLD step Δw = (ε/2)(-nβ∇L_B - γ(w - w*)) + N(0, ε). "auto" first runs
        :func:`slt.calibrate` with short pilot chains (one per candidate, within a budget
        of a fifth of this estimate's steps, which the first candidate's pilot may exceed,
        with this call's nβ, γ, sampler and control
        variate, on the posterior this call then samples, so the pass over the data at w*
        is made once) and uses the step size it picks; the result's ``calibration``
        records every candidate and why.
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
    microbatch : int, "auto" or None
        Draw each minibatch as ``batch_size / microbatch`` whole micro-batches of a random
        partition of the data into groups of ``microbatch`` samples (drawn once from
        ``seed``; the groups are shuffled each epoch), so that the control variate reads
        L_B(w*) and ∇L_B(w*) from a table with one row per micro-batch, built in one pass
        at the start, instead of a pass at w* on every batch: the same estimator on
        differently drawn batches, for about the cost of plain SGLD where the model's
        per-sample gradients do not fit a table (measured on a 17k-parameter transformer:
        29.8 s against 52.9 s per estimate). It must divide n and the batch size, the table
        ((n / microbatch) × parameters numbers) must fit 2**24 numbers, and the loss must be
        a mean of per-sample terms; a ``DataLoader`` over a ``TensorDataset`` only. The
        compiled step (``compile=True``) and ``step_size="auto"``'s pilot chains read the
        same table. "auto" (default): micro-batches only where the gradient control variate
        would otherwise run a pass at w* on every batch (a shuffled ``TensorDataset``, more
        than 4,096 parameters and not all of them in ``nn.Linear`` layers: attention, layer
        norms, convolutions), of the smallest size whose table fits 2**22 numbers with at
        least four micro-batches a batch; elsewhere, or where the table cannot be built,
        per-sample batches as None. The result's ``microbatch`` says which ran. None:
        batches as the loader shuffles them.
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
        only, without per-sample recording). In runs of 500 steps or more the batched
        step's gradient pass is replayed from a traced graph (:mod:`slt.traced`; the same
        numbers, about twice as fast on small models). "auto" takes "vmap" where it
        applies — ``record="loss"``, 2 or more chains where the pass will be traced, 4 or
        more otherwise — and falls back to the loop if the model cannot be vmapped
        (data-dependent control flow, random layers, recurrent layers), and keeps the loop
        for more than 100,000 sampled parameters, where vmap stops paying (0.9x at 395k,
        0.5x at 1M on CPU), and where the batched pass would hold more than 2**21 numbers
        of activations (the model's leaf-module outputs on one batch times the chains,
        twice that with the gradient control variate): there the step is arithmetic, vmap
        gains little (1.09x on a 17k-parameter transformer at 623k numbers per chain) and
        its memory grows with the chains. Models with attention run batched too
        (:mod:`slt.attention`). Measured on
        2 CPU cores with the defaults (benchmarks/bench_vmap.py, 2026-11-30), per
        chain-step over the loop: traced 2.4-3.5x at 4 chains, 2.8-5.8x at 8, 2.7-8.3x at
        16, on models of 10 to 10,400 parameters.
    compile : bool
        With ``chain_method="vmap"``, run the batched step under ``torch.compile``
        (:mod:`slt.compiled`; equal to the eager step up to rounding; an acceptance probe
        costs one more gradient pass than in the eager step). The first estimate
        on a model shape pays seconds of compilation; later ones in the process (the next
        training checkpoint, another step size) reuse it. Measured on one CPU thread:
        1.2-1.4x fewer µs per chain-step than the traced default on small models, after
        2-12 s of compilation; 1.8x on a 17k-parameter transformer, after 25 s.
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
    _checks.choice("sampler", sampler, SAMPLERS)
    auto = isinstance(step_size, str) and step_size == "auto"
    if not auto:
        if isinstance(step_size, str):
            raise ValueError(f'step_size must be a number > 0 or "auto", got {step_size!r}')
        step_size = _checks.real("step_size", step_size, minimum=0, strict=True)
    num_chains = _checks.integer("num_chains", num_chains, minimum=1)
    num_draws = _checks.integer("num_draws", num_draws, minimum=1)
    num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    seed = _checks.seed(seed)
    acceptance_every = _checks.integer("acceptance_every", acceptance_every, minimum=0)
    if chain_method not in ("auto", "loop", "vmap"):
        raise ValueError(f'chain_method must be "auto", "loop" or "vmap", got {chain_method!r}')
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {compile!r}")
    if compile and chain_method != "vmap":
        raise ValueError(
            f'compile=True needs chain_method="vmap", got chain_method={chain_method!r}'
        )
    microbatch = _checks.microbatch(microbatch)
    if record not in ("loss", "per_sample"):
        raise ValueError(f'record must be "loss" or "per_sample", got {record!r}')
    record_every = _checks.integer("record_every", record_every, minimum=1)
    if record == "per_sample" and record_path is None:
        raise ValueError('record="per_sample" streams to a file: pass record_path="....h5"')
    if record == "per_sample" and os.path.isdir(record_path):
        raise ValueError(f"record_path={str(record_path)!r} is a folder; give a file name")
    full_batch = sampler in FULL_BATCH
    if full_batch and control_variate in CONTROL_VARIATES:
        control_variate = "none"  # the full batch makes both control variates moot
    with _globals.private(seed):  # what user code draws from it repeats with seed
        start = time.perf_counter()
        posterior = build_posterior(
            model, loader, loss_fn, n=n, nbeta=nbeta, localization=localization,
            control_variate=control_variate, sampler=sampler, params=params,
            microbatch=microbatch, seed=seed,
        )  # fmt: skip
        for message in posterior.warnings:  # e.g. a train-mode model: point at the caller
            warnings.warn(message, UserWarning, stacklevel=2)
        calibration = None
        if auto:  # the pilots sample this posterior: its pass at w* and tables are made once
            from slt.calibrate import calibrate_posterior, pilot_defaults

            budget = num_chains * (num_burnin + num_draws) // 5
            options = pilot_defaults() | dict(sampler=sampler, max_pilot_steps=budget, seed=seed)
            cal = calibrate_posterior(posterior, **options)
            step_size, calibration = cal.step_size, cal.to_dict()
            start += cal.seconds  # the result's seconds are the estimate's, as before
        return sample_llc(
            posterior, sampler=sampler, step_size=step_size, num_chains=num_chains,
            num_draws=num_draws, num_burnin=num_burnin, seed=seed, progress=progress,
            acceptance_every=acceptance_every, nbeta_default=nbeta is None,
            calibration=calibration, start=start,
            record_every=record_every if record == "per_sample" else 0, record_path=record_path,
            chain_method=chain_method, compile=compile,
        )  # fmt: skip
