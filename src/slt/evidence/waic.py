"""WAIC and the singular fluctuation, from per-sample log-likelihoods streamed over draws.

With ℓ_i(w) = -log p(X_i | w) and E_w the expectation under the tempered posterior
p_β(w) ∝ φ(w) exp(-nβ L_n(w)) (Watanabe 2010, "Asymptotic equivalence of Bayes cross
validation and widely applicable information criterion in singular learning theory",
JMLR 11, eqs. 5-8 and Theorem 1; THEORY.md):

    T_n  = -(1/n) Σ_i log E_w[p(X_i|w)]      (training loss of the Bayes predictive)
    V_n  = Σ_i Var_w[log p(X_i|w)]          (functional variance)
    WAIC = T_n + (β/n) V_n
    ν    = (β/2) E[V_n]                      (singular fluctuation; d/2 for regular models)

and E[G_n] = E[WAIC] + o(1/n), G_n = -E_X[log E_w p(X|w)] the Bayes generalization loss,
for regular and singular models alike; E[G_n] = S + ((λ - ν)/β + ν)/n. The statistics are
accumulated per sample over the recorded draws (running mean and variance by Welford's
method, and log Σ exp(-ℓ_i) for the predictive: :class:`slt.record.PerSampleRecorder`), so
memory is O(chains × n), whatever the number of draws. Given held-out data, the same draws
also estimate G_n directly.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from slt import _checks, _globals
from slt.attention import plain_attention
from slt.data import BatchStream
from slt.diagnostics import MIN_ESS
from slt.evidence._ladder import GlobalPosterior, sampler_notes, warm_starts
from slt.evidence._result import ToDict
from slt.losses import LossFn, per_sample
from slt.record import PerSampleRecorder, PerSampleStats


@dataclass(frozen=True)
class WAICResult(ToDict):
    """WAIC, T_n, V_n, ν (per-sample scale: WAIC and T_n are averages over samples)."""

    waic: float  # T_n + (β/n) V_n
    waic_se: float  # between-chain standard error
    training_loss: float  # T_n = -(1/n) Σ_i log E_w[p(X_i|w)]
    functional_variance: float  # V_n = Σ_i Var_w[log p(X_i|w)]
    functional_variance_se: float
    singular_fluctuation: float  # ν = (β/2) V_n (V_n for E[V_n])
    singular_fluctuation_se: float
    gibbs_training_loss: float  # (1/n) Σ_i E_w[ℓ_i(w)]
    generalization_loss: float  # -(1/m) Σ_j log E_w[p(Y_j|w)] on held-out data, NaN without
    generalization_loss_se: float
    waic_per_chain: np.ndarray  # (chain,) from each chain's draws alone, NaN if it diverged
    singular_fluctuation_per_chain: np.ndarray  # (chain,), NaN if it diverged
    beta: float
    n: int
    n_test: int
    num_params: int
    num_recorded: int  # draws recorded per chain
    prior_std: float | None
    prior_mean: float
    sampler: str
    step_size: float
    acceptance: float
    num_chains: int
    num_draws: int
    num_burnin: int
    record_every: int
    seed: int
    seconds: float
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        held = (
            f"  held-out Bayes generalization loss G = {self.generalization_loss:.8g} ± "
            f"{self.generalization_loss_se:.2g}  (m = {self.n_test})"
            if self.n_test
            else "  (no held-out data)"
        )
        lines = [
            f"WAIC = {self.waic:.8g} ± {self.waic_se:.2g}  (per sample; β {self.beta:g}, "
            f"n {self.n}, d {self.num_params})",
            f"  T_n = {self.training_loss:.8g}   V_n = {self.functional_variance:.5g} ± "
            f"{self.functional_variance_se:.2g}   ν = (β/2) V_n = {self.singular_fluctuation:.4g}"
            f" ± {self.singular_fluctuation_se:.2g}  (d/2 = {self.num_params / 2:g})",
            held,
            f"  {self.sampler} ε {self.step_size:.3g} (accept {self.acceptance:.3f}), "
            f"{self._chains()} × {self.num_recorded} recorded draws (every "
            f"{self.record_every}), {self.seconds:.1f} s",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _chains(self) -> str:
        lost = int(np.isnan(self.waic_per_chain).sum())
        return f"{self.num_chains} chains" + (f" ({lost} diverged, left out)" if lost else "")


class _HeldOut:
    """``observe(chain, t)``: log Σ_t exp(-ℓ_j(w_t)) over recorded draws, per held-out sample."""

    def __init__(self, posterior, loader, per_sample_fn, *, start: int, every: int):
        self.posterior, self.per_sample = posterior, per_sample_fn
        self.stream = BatchStream(loader, posterior.device)
        self.start, self.every = start, every
        self.lse: np.ndarray | None = None
        self.count = 0
        self.non_finite = 0  # passes left out: a NaN or infinite held-out loss

    def __call__(self, chain: int, t: int) -> None:
        if t < self.start or (t - self.start) % self.every:
            return
        with torch.no_grad(), plain_attention(enabled=self.posterior.attention):
            values = torch.cat([
                self.per_sample(self.posterior.module, batch).double().cpu()
                for batch in self.stream.complete_pass()
            ]).numpy()  # fmt: skip
        if not np.isfinite(values).all():
            self.non_finite += 1
            return
        self.lse = -values if self.lse is None else np.logaddexp(self.lse, -values)
        self.count += 1


def waic(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    beta: float = 1.0,
    prior_std: float | None = 1.0,
    prior_mean: float = 0.0,
    test_loader: Iterable | None = None,
    record_every: int = 4,
    sampler: str = "auto",
    step_scale: float | None = None,
    control_variate: str = "gradient",
    num_chains: int = 8,
    num_draws: int = 400,
    num_burnin: int = 200,
    num_anneal: int = 6,
    seed: int = 0,
    progress: bool = True,
) -> WAICResult:
    """WAIC, T_n, V_n and the singular fluctuation ν from per-sample log-likelihoods.

    T_n = -(1/n) Σ_i log E_w[p(X_i|w)], V_n = Σ_i Var_w[log p(X_i|w)], WAIC = T_n + (β/n)V_n
    and ν = (β/2) V_n, with E_w under p_β(w) ∝ φ(w) exp(-nβ L_n(w)) (Watanabe 2010, JMLR 11;
    ν = (β/2) E[V_n] is estimated by this dataset's V_n). E[WAIC] = E[G_n] + o(1/n), with
    G_n the Bayes generalization loss; with ``test_loader`` the same draws estimate G_n on
    held-out data as -(1/m) Σ_j log E_w[p(Y_j|w)]. Every ``record_every``-th draw evaluates
    the per-sample NLL of all n samples (a full pass, in a fixed order) and folds it into
    running statistics, so memory is O(chains × n). Chains start as in :func:`slt.wbic`
    (prior draws annealed up to β).

    Parameters
    ----------
    model, loader, loss_fn, n : as for :func:`slt.estimate_llc`. ``loss_fn`` must be the
        batch mean of a per-sample NLL (its per-sample values come from
        :func:`slt.losses.per_sample`); n must be the number of samples the loader yields.
    beta : float
        Inverse temperature of the posterior (1: the Bayes posterior).
    prior_std, prior_mean : the prior N(μ, σ² I); ``prior_std=None`` for a flat prior.
    test_loader : re-iterable of held-out batches, optional
    record_every : int
        Record every this many post-burn-in steps (each record is a pass over the data,
        and over ``test_loader`` if given).
    sampler, step_scale, control_variate, num_chains, num_draws, num_burnin, num_anneal,
    seed, progress : as for :func:`slt.wbic`.

    Examples
    --------
    >>> import torch, slt
    >>> case = slt.zoo.regular(2, n=200)
    >>> res = waic(case.model, case.loader(), case.loss_fn, num_chains=4, num_draws=200,
    ...            num_burnin=50, num_anneal=0, progress=False)
    >>> abs(res.singular_fluctuation - 1.0) < 0.3   # d/2 for a regular model
    True
    """
    t0 = time.perf_counter()
    beta = _checks.real("beta", beta, minimum=0, strict=True)
    num_chains = _checks.integer("num_chains", num_chains, minimum=2)
    num_draws = _checks.integer("num_draws", num_draws, minimum=2)
    num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    num_anneal = _checks.integer("num_anneal", num_anneal, minimum=0)
    record_every = _checks.integer("record_every", record_every, minimum=1)
    if record_every >= num_draws:  # V_n is a variance over draws: it needs two of them
        raise ValueError(
            f"record_every={record_every} with num_draws={num_draws} records one draw per "
            "chain; V_n and ν need at least two: take record_every < num_draws"
        )
    seed = _checks.seed(seed)
    if test_loader is not None:  # checked before any sampling (it was torch.cat's error after)
        held_out = BatchStream(test_loader, torch.device("cpu"))
        if next(iter(held_out.complete_pass()), None) is None:
            raise ValueError("test_loader: yielded no batches (is the held-out set empty?)")
    with _globals.private(seed):  # what user code draws from it repeats with seed
        gp = GlobalPosterior(model, loader, loss_fn, n=n, prior_std=prior_std,
                             prior_mean=prior_mean, sampler=sampler,
                             control_variate=control_variate, step_scale=step_scale)  # fmt: skip
        starts, _ = warm_starts(gp, num_chains=num_chains, beta=beta, num_anneal=num_anneal,
                                num_burnin=num_burnin, seed=seed, progress=progress)  # fmt: skip
        fn = per_sample(loss_fn)
        recorders: dict[int, PerSampleRecorder] = {}
        held: dict[int, _HeldOut] = {}

        def observe(rung: int, chain: int, post):
            rec = recorders[chain] = PerSampleRecorder(post, num_chains=1, start=num_burnin,
                                                       every=record_every)  # fmt: skip
            if test_loader is None:
                return rec
            out = held[chain] = _HeldOut(post, test_loader, fn, start=num_burnin,
                                         every=record_every)  # fmt: skip

            def both(c: int, t: int) -> None:
                rec(c, t)
                out(c, t)

            return both

        rungs, _ = gp.run(starts, [beta], num_draws=[num_draws], num_burnin=[num_burnin], seed=seed,
                          progress=progress, observe=observe)  # fmt: skip
        rung = rungs[0]
        ok = [c for c in range(num_chains) if not rung.diverged[c]]
        parts = [recorders[c].close() for c in ok]
        stats = PerSampleStats(
            np.concatenate([p.count for p in parts]),
            np.concatenate([p.mean for p in parts]),
            np.concatenate([p.m2 for p in parts]),
            np.concatenate([p.log_sum_exp_neg for p in parts]),
        )
        n_samples = stats.mean.shape[1]
        mean, var, lse = stats.pooled()
        t_n = float(-lse.mean())
        v_n = float(var.sum())
        chain_t = -(stats.log_sum_exp_neg - np.log(stats.count)[:, None]).mean(1)
        chain_v = (stats.m2 / np.maximum(stats.count - 1, 1)[:, None]).sum(1)
        chain_waic = chain_t + beta / n_samples * chain_v
        per_chain_waic = np.full(num_chains, math.nan)  # (chain,), NaN where a chain diverged
        per_chain_waic[ok] = chain_waic
        per_chain_nu = np.full(num_chains, math.nan)
        per_chain_nu[ok] = beta / 2 * chain_v
        root = math.sqrt(len(ok))
        gen, gen_se, n_test = math.nan, math.nan, 0
        notes = list(gp.warnings)
        if test_loader is not None:
            seen = [c for c in ok if held[c].count]  # chains with a finite held-out pass
            lost = sum(held[c].non_finite for c in ok)
            if lost:
                notes.append(
                    f"{lost} of {lost + sum(held[c].count for c in ok)} held-out passes gave a "
                    f"NaN or infinite loss and were left out of G" + ("" if seen else ": no G")
                )
            if seen:
                lses = np.stack([held[c].lse - math.log(held[c].count) for c in seen])
                n_test = lses.shape[1]
                pooled = np.logaddexp.reduce(lses, axis=0) - math.log(len(seen))
                gen = float(-pooled.mean())
                gen_se = (float((-lses.mean(1)).std(ddof=1) / math.sqrt(len(seen)))
                          if len(seen) > 1 else math.nan)  # fmt: skip
        if rung.diverged.any():
            notes.append(f"{int(rung.diverged.sum())} of {num_chains} chains diverged")
        if gp.sampler == "sgld" and rung.acceptance < 0.9:
            notes.append(
                f"MALA acceptance of the SGLD moves {rung.acceptance:.2f} < 0.9: the step is too "
                "large; lower step_scale"
            )
        if not rung.ess >= MIN_ESS:
            notes.append(
                f"effective sample size {rung.ess:.0f} < {MIN_ESS} (of the chains' n L_n): V_n "
                "and its standard error rest on few independent draws; use more draws or chains"
            )
        notes += sampler_notes([rung], gp.sampler)
        for note in gp.warnings:
            warnings.warn(note, UserWarning, stacklevel=2)
        return WAICResult(
            waic=t_n + beta / n_samples * v_n,
            waic_se=float(chain_waic.std(ddof=1) / root),
            training_loss=t_n,
            functional_variance=v_n,
            functional_variance_se=float(chain_v.std(ddof=1) / root),
            singular_fluctuation=beta / 2 * v_n,
            singular_fluctuation_se=float(beta / 2 * chain_v.std(ddof=1) / root),
            gibbs_training_loss=float(mean.mean()),
            generalization_loss=gen,
            generalization_loss_se=gen_se,
            waic_per_chain=per_chain_waic,
            singular_fluctuation_per_chain=per_chain_nu,
            beta=beta,
            n=n_samples,
            n_test=n_test,
            num_params=gp.num_params,
            num_recorded=int(stats.count.min()),
            prior_std=gp.prior_std,
            prior_mean=gp.prior_mean,
            sampler=gp.sampler,
            step_size=rung.step_size,
            acceptance=rung.acceptance,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=num_burnin,
            record_every=record_every,
            seed=seed,
            seconds=time.perf_counter() - t0,
            warnings=tuple(notes),
        )
