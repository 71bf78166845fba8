"""Chains on the global tempered posterior, carried up a ladder of inverse temperatures.

p_β(w) ∝ φ(w) exp(-nβ L_n(w)), φ = N(μ, σ² I) (or flat), is sampled at β_1 < β_2 < ...
by chains that start from independent prior draws (or at the model's parameters w*) and
carry their last state from each rung to the next (warm starts). A singular posterior is
wide along its minimizer set, and a chain started at one point crosses it in about
2σ²/ε steps, far more than a rung can afford at large nβ; carried up from the prior, the
chains arrive at each rung already spread along it. Each rung's Posterior is built at the
chain's starting point, which serves as the control-variate reference: the target does
not depend on it (the prior is centred at μ), and the per-draw value

    n · (L_n(w_s) + L_B(w_t) - L_B(w_s))

is an unbiased estimate of n L_n(w_t) (exact with the full batch).

Step size per rung: ε_β = ``step_scale`` / (nβ q + 1/σ²) (MALA: also divided by d^(1/3)),
with q the largest Hessian eigenvalue of L_n (power iteration,
:func:`slt.curvature.top_hessian_eigenvalue`) over the chains' starting points and w*. For a
Gaussian direction of precision P, full-batch SGLD inflates the variance by 1/(1 - εP/4)
(``slt.calibrate``), so ``step_scale`` = 0.04 keeps that at 1% in the stiffest direction
seen; MALA is exact at any step and takes εP = 2.5 d^(-1/3).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from slt import _checks
from slt._checks import NonFiniteLoss
from slt.chains import DivergenceError, run_chains
from slt.curvature import top_hessian_eigenvalue
from slt.data import BatchStream
from slt.posterior import Posterior, mean_loss
from slt.samplers import FULL_BATCH, SAMPLERS
from slt.sampling import build_posterior

DEFAULT_STEP_SCALE = {"sgld": 0.04, "mala": 2.5}
"""ε·P_max per sampler (MALA: times d^(1/3)). SGLD's stationary variance in the stiffest
direction is inflated by 1/(1 - εP/4), 1% at 0.04. MALA has the exact target at any ε; its
best step shrinks like d^(-1/3) (Roberts & Rosenthal 1998, JRSS B 60), and at
εP = 2.5 d^(-1/3) it accepted 0.6-0.97 of its proposals on the zoo's 2- and 3-parameter
potentials and 4-parameter regressions (measured)."""


@dataclass(frozen=True)
class Rung:
    """The draws of one rung. ``values`` is (chain, draw): per-draw estimates of n L_n(w_t)."""

    beta: float
    step_size: float
    top_eigenvalue: float  # largest |Hessian eigenvalue| of L_n at the starts and at w*
    values: np.ndarray  # (chain, draw), NaN rows for diverged chains
    diverged: np.ndarray  # (chain,) bool
    acceptance: float  # mean MALA acceptance of the moves (SGLD: of every 20th), NaN if none
    seconds: float

    @property
    def usable(self) -> np.ndarray:
        return self.values[~self.diverged]

    @property
    def mean(self) -> float:
        """E_β[n L_n], the mean over usable chains and draws."""
        return float(self.usable.mean())

    @property
    def chain_means(self) -> np.ndarray:
        """(chain,) per-chain means, NaN for diverged chains."""
        return self.values.mean(axis=1)

    @functools.cached_property
    def _diagnostics(self):
        from slt.diagnostics import diagnose

        return diagnose(self.values, diverged=self.diverged)

    @property
    def mcse(self) -> float:
        """Monte Carlo standard error of ``mean``: sd / √ESS (arviz-stats, method "mean")."""
        return float(self._diagnostics.mcse)

    @property
    def ess(self) -> float:
        """Effective sample size of ``mean`` over usable chains."""
        return float(self._diagnostics.ess_mean)


def sampler_notes(rungs: Sequence[Rung], sampler: str) -> list[str]:
    """Warnings every ladder gives: chains that never moved on a rung (their draws one
    value: ESS and MCSE are NaN, and a mean over them says nothing), fewer than
    :data:`MIN_CHAINS` chains, and MALA accepting under 20% of its proposals."""
    notes = []
    still = [(rung.beta, np.flatnonzero(rung._diagnostics.constant)) for rung in rungs]
    still = [f"at β = {beta:.3g} chain(s) {', '.join(map(str, c))}" for beta, c in still if c.size]
    if still:
        notes.append(
            f"chains never moved ({'; '.join(still)}): their draws are one value (every MALA "
            "proposal rejected, or steps too small to change the loss), so they say nothing "
            "about the posterior; " + ("lower step_scale" if sampler == "mala" else "raise it")
        )
    chains = rungs[0]._diagnostics.diverged.size if rungs else MIN_CHAINS
    if chains < MIN_CHAINS:
        notes.append(
            f"only {chains} chains: chains stuck alike in one part of a singular posterior "
            "agree with each other, so neither R̂ nor the error bar sees it (a²b⁴ at 2 × 50 "
            f"draws read 15 error bars low, unwarned); use num_chains >= {MIN_CHAINS}"
        )
    low = [r.beta for r in rungs if sampler == "mala" and r.acceptance < MIN_MALA_ACCEPTANCE]
    if low:
        notes.append(
            f"MALA accepted under {MIN_MALA_ACCEPTANCE:.0%} of its proposals at β = "
            f"{', '.join(f'{b:.3g}' for b in low)}: the chains barely move; lower step_scale"
        )
    return notes


MIN_CHAINS = 4
"""Fewer chains than this get a warning from every ladder (the defaults run 8)."""

MIN_MALA_ACCEPTANCE = 0.2
"""Below this MALA acceptance a ladder's chains barely move (as :func:`slt.estimate_llc`)."""


class GlobalPosterior:
    """The user's model, data and prior: prior draws, L_n at any state, chains per rung."""

    def __init__(
        self,
        model: torch.nn.Module,
        loader,
        loss_fn,
        *,
        n: int | None,
        prior_std: float | None,
        prior_mean: float,
        sampler: str,
        control_variate: str,
        step_scale: float | None,
    ):
        if sampler not in ("auto", "sgld", "mala"):
            raise ValueError(f'sampler must be "auto", "sgld" or "mala", got {sampler!r}')
        if prior_std is not None:  # None: a flat prior (WBIC and WAIC allow it)
            prior_std = _checks.real("prior_std", prior_std, minimum=0, strict=True)
        prior_mean = _checks.real("prior_mean", prior_mean)
        self.model, self.loader, self.loss_fn = model, loader, loss_fn
        self.prior_std, self.prior_mean = prior_std, prior_mean
        self.precision = 0.0 if prior_std is None else 1.0 / prior_std**2
        self.sampler = "mala" if sampler == "auto" else sampler
        self.control_variate = "none" if self.sampler in FULL_BATCH else control_variate
        # the posterior at w*: n, L_n(w*), the parameter names, q at w*
        try:
            self.center_posterior = self._posterior(model, n=n, nbeta=1.0)
        except ValueError:
            if sampler != "auto":
                raise
            self.sampler, self.control_variate = "sgld", control_variate  # not one batch
            self.center_posterior = self._posterior(model, n=n, nbeta=1.0)
        if step_scale is None:
            step_scale = DEFAULT_STEP_SCALE[self.sampler]
        self.step_scale = _checks.real("step_scale", step_scale, minimum=0, strict=True)
        self.n = self.center_posterior.n
        self.names = list(self.center_posterior.names)
        self.center = {k: v.detach().clone() for k, v in self.center_posterior.center.items()}
        self.nll_at_center = self.n * self.center_posterior.init_loss
        self.num_params = self.center_posterior.num_params
        self._center_q: float | None = None
        self.warnings: list[str] = list(self.center_posterior.warnings)
        samples = self.center_posterior.num_samples
        if self.n != samples:  # waic refuses it (its per-sample terms need n of them)
            self.warnings.append(
                f"n = {self.n}, but one pass of the loader holds {samples} samples: n L_n "
                f"counts their mean loss {self.n / samples:.3g} times over, so the free "
                f"energies are those of a data set of {self.n} such samples"
            )

    def _posterior(self, model, *, n, nbeta) -> Posterior:
        return build_posterior(
            model, self.loader, self.loss_fn, n=n, nbeta=nbeta, localization=self.precision,
            control_variate=self.control_variate, sampler=self.sampler,
            prior_mean=None if self.prior_std is None else self.prior_mean,
        )  # fmt: skip

    def model_at(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A copy of the model with the sampled parameters set to ``state``."""
        module = copy.deepcopy(self.model)
        own = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        return module

    def prior_draws(self, num: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
        if self.prior_std is None:
            raise ValueError("prior draws need a proper prior: prior_std must be a number")
        return [
            {k: self.prior_mean + self.prior_std * torch.randn(v.shape, generator=generator,
                                                              dtype=v.dtype).to(v.device)
             for k, v in self.center.items()}
            for _ in range(num)
        ]  # fmt: skip

    def full_nll(self, state: dict[str, torch.Tensor]) -> float:
        """n L_n(w) at ``state``, one pass over the data."""
        module = self.model_at(state).eval()
        stream = BatchStream(self.loader, self.center[self.names[0]].device)
        return self.n * mean_loss(module, stream, self.loss_fn)

    def nll_at_prior_draws(self, draws: list[dict[str, torch.Tensor]]) -> np.ndarray:
        """n L_n(w) at each prior draw, (draw,); raises where it is NaN or infinite (the
        chains start at prior draws, and thermodynamic integration averages over them)."""
        values = np.array([self.full_nll(s) for s in draws])
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"the loss is {values[bad][0]} at {int(bad.sum())} of {len(draws)} draws from "
                f"the prior N({self.prior_mean:g}, {self.prior_std:g}² I), where chains start: "
                "the model and loss_fn must be finite there; take a prior_std (or prior_mean) "
                "under which they are"
            )
        return values

    def _probe_batch(self, posterior: Posterior):
        if posterior.full_data is not None:
            return posterior.full_data
        return next(posterior.batches.complete_pass())

    def top_eigenvalue(self, posterior: Posterior) -> float:
        """Largest |eigenvalue| of the Hessian of L at the posterior's w*."""
        return top_hessian_eigenvalue(posterior, self._probe_batch(posterior), iters=10)

    def step_size(self, nbeta: float, q: float) -> float:
        if not math.isfinite(q):  # a NaN Hessian-vector product (0 · inf in the model)
            raise ValueError(
                f"the top Hessian eigenvalue of L_n came out {q} at the chains' starting "
                "points, which sets the step size: the model's second derivatives are not "
                "finite there (a power w**0 at w = 0 gives 0 · inf); write the model so they are"
            )
        precision = nbeta * q + self.precision
        if not precision > 0:
            raise ValueError(
                "the Hessian of L_n is zero at every starting point and the prior is flat "
                "(prior_std=None): no curvature to set the step size by; use a proper prior"
            )
        scale = self.step_scale
        if self.sampler == "mala":
            scale /= self.num_params ** (1 / 3)
        return scale / precision

    def run(
        self,
        states: Sequence[dict[str, torch.Tensor]],
        betas: Sequence[float],
        *,
        num_draws: Sequence[int],
        num_burnin: Sequence[int],
        seed: int,
        stream: int = 0,
        progress: bool = False,
        observe: Callable[[int, int, Posterior], Callable[[int, int], None] | None] | None = None,
    ) -> tuple[list[Rung], list[dict[str, torch.Tensor]]]:
        """Carry chains from ``states`` up ``betas``; returns the rungs and the final states.

        Chain c on rung k is seeded from (seed, stream, k, c).

        ``observe(rung, chain, posterior)``, if given, returns an ``observe`` hook for that
        chain's run on that rung (see :func:`slt.chains.run_chains`), or None.
        """
        states = [dict(s) for s in states]
        num_chains = len(states)
        dead = np.zeros(num_chains, dtype=bool)
        rungs = []
        total = sum((b + d) * num_chains for b, d in zip(num_burnin, num_draws))
        bar = tqdm(total=total, disable=not progress, desc="evidence", unit="step")
        if self._center_q is None:
            self._center_q = self.top_eigenvalue(self.center_posterior)
        for k, beta in enumerate(betas):
            t0 = time.perf_counter()
            nbeta = self.n * beta
            posts = []
            for c in range(num_chains):
                try:
                    posts.append(None if dead[c] else self._posterior(
                        self.model_at(states[c]), n=self.n, nbeta=nbeta))  # fmt: skip
                except NonFiniteLoss:
                    if k == 0:  # the caller's starting points
                        raise
                    # the last step of the rung below landed where the loss is not finite
                    # (the trace holds the loss before each step): that chain diverged
                    dead[c] = True
                    posts.append(None)
            if dead.all():
                bar.close()
                raise DivergenceError(
                    f"every chain diverged before β = {beta:.4g} (its last step on the rung "
                    "below left the loss non-finite); lower step_scale"
                )
            q = max([self._center_q] + [self.top_eigenvalue(p) for p in posts if p is not None])
            eps = self.step_size(nbeta, q)
            steps = num_burnin[k] + num_draws[k]
            values = np.full((num_chains, num_draws[k]), np.nan)
            accept = []
            kernel = SAMPLERS[self.sampler]
            for c, post in enumerate(posts):
                if post is None:
                    bar.update(steps)
                    continue
                chain_seed = int(
                    np.random.SeedSequence([seed, stream, k, c]).generate_state(1)[0] >> 1
                )
                hook = observe(k, c, post) if observe is not None else None
                trace = run_chains(
                    post,
                    kernel(step_size=eps, nbeta=post.nbeta, localization=post.localization,
                           center=post.anchor),
                    num_chains=1, num_steps=steps, seed=chain_seed, progress=False,
                    acceptance_every=20 if self.sampler == "sgld" else 0, step_size=eps,
                    observe=hook, job_steps=total,
                )  # fmt: skip
                bar.update(steps)
                if trace.diverged[0]:
                    dead[c] = True
                    continue
                loss = trace.loss[0, num_burnin[k] :]
                ref = trace.loss_at_center[0, num_burnin[k] :]
                values[c] = self.n * (post.init_loss + loss - ref)
                acc = trace.acceptance[0, num_burnin[k] :]
                accept.extend(acc[np.isfinite(acc)].tolist())
                states[c] = {name: p.detach().clone() for name, p in post.params.items()}
            if dead.all():
                bar.close()
                raise DivergenceError(
                    f"every chain diverged at β = {beta:.4g} (step size {eps:.3g}); lower "
                    "step_scale"
                )
            rungs.append(
                Rung(
                    beta=float(beta), step_size=eps, top_eigenvalue=q, values=values,
                    diverged=dead.copy(), acceptance=float(np.mean(accept)) if accept else math.nan,
                    seconds=time.perf_counter() - t0,
                )
            )  # fmt: skip
        bar.close()
        return rungs, states


def seeded_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *key)."""
    value = int(np.random.SeedSequence([seed, *key]).generate_state(1)[0] >> 1)
    return torch.Generator().manual_seed(value)


def geometric(low: float, high: float, num: int) -> np.ndarray:
    """``num`` points from ``low`` to ``high``, equally spaced in log."""
    return np.exp(np.linspace(math.log(low), math.log(high), num))


def warm_starts(
    gp: GlobalPosterior,
    *,
    num_chains: int,
    beta: float,
    num_anneal: int,
    num_burnin: int,
    seed: int,
    progress: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Chain states spread over p_β: prior draws carried up ``num_anneal`` geometric rungs
    (``max(num_burnin // 4, 10)`` steps each) from where β·sd_prior(n L_n) = 0.03 to below
    β; with a flat prior, w* for every chain. Also returns the annealing time in seconds."""
    t0 = time.perf_counter()
    if gp.prior_std is None:
        return [dict(gp.center) for _ in range(num_chains)], 0.0
    draws = gp.prior_draws(max(num_chains, 32), seeded_generator(seed, 2**31))
    starts = draws[:num_chains]
    if num_anneal == 0 or num_burnin == 0:
        gp.nll_at_prior_draws(starts)
        return starts, time.perf_counter() - t0
    spread = float(np.std(gp.nll_at_prior_draws(draws), ddof=1))
    low = 0.03 / max(spread, 1e-12)
    if low >= beta:
        return starts, time.perf_counter() - t0
    ladder = geometric(low, beta, num_anneal + 1)[:-1]
    _, states = gp.run(starts, ladder, num_draws=[0] * num_anneal,
                       num_burnin=[max(num_burnin // 4, 10)] * num_anneal, seed=seed, stream=1,
                       progress=progress)  # fmt: skip
    return states, time.perf_counter() - t0
