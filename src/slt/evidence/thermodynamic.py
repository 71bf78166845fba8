"""The Bayes free energy F_n by thermodynamic integration over a ladder of temperatures.

F_n = -log ∫ exp(-n L_n(w)) φ(w) dw with φ a normalized prior, and d/dβ F(β) =
E_β[n L_n(w)] under p_β ∝ φ exp(-nβ L_n), so (Ogata 1989, Numer. Math. 55; Gelman & Meng
1998, Stat. Sci. 13; Friel & Pettitt 2008, JRSS B 70, "power posteriors")

    F_n = ∫₀¹ E_β[n L_n(w)] dβ.

The integrand is E_prior[n L_n] at β = 0 and falls (its derivative is -Var_β[n L_n]) to
n L_n(w0) + λ/β + ... once nβ is large: it changes fastest near β = 0, and over most of
[0, 1] like 1/β. So the ladder is β = 0 (the prior itself, sampled exactly by independent
draws), then β₁ < ... < β_K = 1 geometric, and the rule (:func:`ladder_weights`) is the
trapezoid on [0, β₁] and, above, the two-point rule exact for g = a + b/β on each
interval (in log β: exact for β g = aβ + b, second order otherwise).

Errors reported:

- **Monte Carlo**: F is a weighted sum Σ_k w_k E_k of the rung means, so its variance is
  Σ w_k² se_k² with se_k each rung's MCSE (ESS-based; independent draws at β = 0). Chains
  carry their state from rung to rung, which correlates neighbouring rungs; the spread of
  the per-chain integrals (each chain threads the whole ladder) accounts for that, and
  ``mc_error`` is the larger of the two.
- **Integration**: |T - T₂|/3, with T₂ the same rule on every other rung of the ladder
  (Richardson: a second-order error falls 4× when the spacing halves; with an odd number of
  intervals, the larger of the two ways to pair them), plus
  β₁|g(0) - g(β₁)|/2, a bound on the trapezoid over [0, β₁] for the decreasing g.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slt import _checks, _globals
from slt.diagnostics import MIN_ESS
from slt.evidence._ladder import GlobalPosterior, geometric, sampler_notes, seeded_generator
from slt.evidence._result import ToDict
from slt.losses import LossFn


@dataclass(frozen=True)
class FreeEnergyResult(ToDict):
    """F_n by thermodynamic integration. Arrays are ``(rung,)``, rung 0 being β = 0 (the prior)."""

    free_energy: float  # F_n = ∫₀¹ E_β[n L_n] dβ
    mc_error: float  # one standard deviation: max(propagated, between chains)
    integration_error: float  # |T - T₂|/3 + β₁|g(0) - g(β₁)|/2
    mc_error_propagated: float  # √Σ w_k² se_k²
    mc_error_between_chains: float  # sd over chains of the per-chain integrals / √chains
    betas: np.ndarray  # (rung,) 0, β₁, ..., 1
    expected_nll: np.ndarray  # (rung,) E_β[n L_n]
    expected_nll_se: np.ndarray  # (rung,) its Monte Carlo standard error
    weights: np.ndarray  # (rung,) F = Σ_k w_k E_k (:func:`ladder_weights`; Σ_k w_k = 1)
    ess: np.ndarray  # (rung,) effective sample size of each rung's mean (draws at β = 0)
    step_size: np.ndarray  # (rung,) ε per rung, NaN at β = 0
    top_eigenvalue: np.ndarray  # (rung,) q behind ε, NaN at β = 0
    acceptance: np.ndarray  # (rung,) mean MALA acceptance of the moves
    per_chain: np.ndarray  # (chain,) the integral from each chain's rung means
    nll_at_center: float  # C = n L_n(w*), w* the model's parameters
    n: int
    num_params: int
    prior_std: float
    prior_mean: float
    sampler: str
    num_chains: int
    num_draws: int
    num_burnin: int
    num_prior_draws: int
    seed: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def error(self) -> float:
        """√(mc_error² + integration_error²)."""
        return math.hypot(self.mc_error, self.integration_error)

    def __str__(self) -> str:
        lines = [
            f"Bayes free energy F_n = {self.free_energy:.8g} ± {self.mc_error:.2g} (Monte Carlo) "
            f"± {self.integration_error:.2g} (integration)   thermodynamic integration",
            f"  n {self.n}, d {self.num_params}, "
            f"prior N({self.prior_mean:g}, {self.prior_std:g}²), "
            f"{len(self.betas)} rungs (β = 0 and {self.betas[1]:.3g} to 1), {self.sampler}, "
            f"{self.num_chains} chains × {self.num_draws} draws per rung, {self.seconds:.1f} s",
            f"  n L_n(w*) {self.nll_at_center:.8g}   F_n - n L_n(w*) "
            f"{self.free_energy - self.nll_at_center:.6g}",
            f"  {'β':>10} {'E_β[n L_n] - n L_n(w*)':>24} {'± se':>9} {'ESS':>7} {'ε':>9} "
            f"{'accept':>7}",
        ]
        for b, e, s, ess, eps, acc in zip(self.betas, self.expected_nll, self.expected_nll_se,
                                          self.ess, self.step_size, self.acceptance):  # fmt: skip
            lines.append(
                f"  {b:>10.4g} {e - self.nll_at_center:>24.6g} {s:>9.2g} {ess:>7.0f} "
                f"{eps:>9.3g} {acc:>7.3f}"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def ladder_weights(betas: np.ndarray) -> np.ndarray:
    """Weights w with ∫₀¹ g(β) dβ ≈ Σ_k w_k g(β_k) on the ladder (0, β₁, ..., β_K = 1).

    On [0, β₁] the trapezoid rule. On each [β_k, β_{k+1}] above, the two-point rule exact for
    g = a + b/β, the form E_β[n L_n] ≈ n L_n(w0) + λ/β takes once nβ is large: with
    r = β_{k+1}/β_k, w_k += β_k (r log r/(r - 1) - 1) and w_{k+1} += β_{k+1}(1 - log r/(r - 1)).
    Both are positive; for smooth g the error falls as the square of the spacing in log β.

    >>> b = np.concatenate([[0.0], np.geomspace(1e-3, 1, 9)])
    >>> w = ladder_weights(b)
    >>> upper = w[1:] - np.r_[b[1] / 2, np.zeros(8)]  # the part of the weights above β₁
    >>> round(float(w.sum()), 12), round(float(upper @ (1 / b[1:])), 12)  # ∫₀¹ 1, ∫_{β₁}^1 dβ/β
    (1.0, 6.907755278982)
    """
    betas = np.asarray(betas, dtype=float)
    w = np.zeros(len(betas))
    w[0] = w[1] = betas[1] / 2
    lo, hi = betas[1:-1], betas[2:]
    r = hi / lo
    log_r = np.log(r)
    w[1:-1] += lo * (r * log_r / (r - 1) - 1)
    w[2:] += hi * (1 - log_r / (r - 1))
    return w


def free_energy(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    prior_std: float = 1.0,
    prior_mean: float = 0.0,
    betas: Sequence[float] | None = None,
    num_rungs: int = 13,
    beta_min: float | None = None,
    sampler: str = "auto",
    step_scale: float | None = None,
    control_variate: str = "gradient",
    num_chains: int = 8,
    num_draws: int = 400,
    num_burnin: int = 100,
    num_prior_draws: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> FreeEnergyResult:
    """The Bayes free energy F_n = -log ∫ exp(-n L_n) φ by thermodynamic integration.

    F_n = ∫₀¹ E_β[n L_n(w)] dβ, with E_β under the global tempered posterior
    p_β(w) ∝ φ(w) exp(-nβ L_n(w)) and φ = N(μ, σ² I) normalized (Ogata 1989; Friel &
    Pettitt 2008; THEORY.md). Chains start from independent prior draws and climb the ladder
    β = 0 < β₁ < ... < 1 (geometric above β₁), carrying their state from rung to rung; the
    integral is the trapezoid rule on [0, β₁] and above it the two-point rule exact for
    E_β[n L_n] = a + b/β on each interval (see the module docstring for the errors). A
    singular model's posterior is wide along its minimizer set, so chains started at one
    point would need about 2σ²/ε steps per rung to cover it; carried up from the prior they
    arrive spread out.

    Parameters
    ----------
    model : torch.nn.Module
        The model; its parameters w* give n L_n(w*), reported for reference (the table
        prints E_β[n L_n] - n L_n(w*)), and are never changed.
    loader, loss_fn : as for :func:`slt.estimate_llc` (mean per-sample NLL).
    n : int, optional
        Sample size; default ``len(loader.dataset)``.
    prior_std, prior_mean : float
        σ and μ of the prior N(μ, σ² I) on every trainable parameter. It must be proper:
        with a flat prior F_n is not defined.
    betas : sequence of float, optional
        The ladder above 0: at least 3 values, ascending, ending at 1 (the integration error
        compares the rule on every other rung). Default: ``num_rungs`` (≥ 3) points geometric
        from ``beta_min`` to 1.
    beta_min : float, optional
        In (0, 1). Default min(0.5, 0.03 / sd_prior(n L_n)), sd_prior the standard deviation
        of n L_n over the prior draws: where β times it is 0.03 the posterior is still the
        prior.
    sampler : {"auto", "mala", "sgld"}
        "auto": MALA (exact at any step size) when the whole dataset is available as one
        batch (a ``DataLoader`` over a ``TensorDataset``), else SGLD.
    step_scale : float, optional
        ε_β = step_scale / (nβ q + 1/σ²) (MALA: also / d^(1/3)), q the largest |Hessian
        eigenvalue| of L_n at each rung's starting points and at w*. Default 0.04 for SGLD
        (1% variance inflation in the stiffest direction), 2.5 for MALA.
    control_variate : {"gradient", "loss", "none"}
        As for :func:`slt.estimate_llc`, with each chain's starting point of the rung as
        the reference; ignored (full batch) for MALA.
    num_chains, num_draws, num_burnin : int
        Per rung: each chain takes ``num_burnin`` steps from where it left the rung below,
        then ``num_draws`` recorded steps.
    num_prior_draws : int
        Independent prior draws for E_0[n L_n] (the first ``num_chains`` start the chains).
    seed : int
    progress : bool

    Returns
    -------
    FreeEnergyResult

    Examples
    --------
    >>> import torch, slt
    >>> case = slt.zoo.regular(1, n=64)
    >>> res = free_energy(case.model, case.loader(64), case.loss_fn, num_rungs=5,
    ...                   num_draws=50, num_burnin=20, progress=False)
    >>> res.betas.shape, res.mc_error > 0
    ((6,), True)
    """
    t0 = time.perf_counter()
    if prior_std is None:  # wbic and waic take None (flat); here the integral needs a prior
        raise ValueError(
            "prior_std=None (a flat prior): F_n = -log ∫ exp(-n L_n) φ needs a proper prior φ, "
            "whose integral is 1 (a flat one has none); give prior_std > 0"
        )
    prior_std = _checks.real("prior_std", prior_std, minimum=0, strict=True)
    num_chains = _checks.integer("num_chains", num_chains, minimum=2)
    num_draws = _checks.integer("num_draws", num_draws, minimum=4)
    num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    num_prior_draws = _checks.integer("num_prior_draws", num_prior_draws, minimum=num_chains)
    seed = _checks.seed(seed)
    with _globals.private(seed):  # what user code draws from it repeats with seed
        gp = GlobalPosterior(model, loader, loss_fn, n=n, prior_std=prior_std,
                             prior_mean=prior_mean, sampler=sampler,
                             control_variate=control_variate, step_scale=step_scale)  # fmt: skip
        draws = gp.prior_draws(num_prior_draws, seeded_generator(seed, 2**31))
        prior_values = gp.nll_at_prior_draws(draws)  # E_prior[n L_n]: the integral at β = 0
        starts = draws[:num_chains]
        if betas is None:
            num_rungs = _checks.integer("num_rungs", num_rungs, minimum=3)
            if beta_min is None:  # where β·sd_prior(n L_n) = 0.03 the posterior is still the prior
                beta_min = min(0.5, 0.03 / max(float(prior_values.std(ddof=1)), 1e-12))
            beta_min = _checks.real("beta_min", beta_min, minimum=0, strict=True)
            if beta_min >= 1:
                raise ValueError(
                    f"beta_min must be < 1 (the ladder climbs to β = 1), got {beta_min!r}"
                )
            ladder = geometric(beta_min, 1.0, num_rungs)
        else:
            ladder = np.asarray(betas, dtype=float)
            if (
                ladder.ndim != 1
                or len(ladder) < 3
                or not (np.all(np.diff(ladder) > 0) and ladder[0] > 0 and ladder[-1] == 1.0)
            ):
                raise ValueError(
                    f"betas must be at least 3 values ascending from > 0 to exactly 1 (the "
                    f"integration error compares the rule on every other rung), got {betas!r}"
                )
        rungs, _ = gp.run(starts, ladder, num_draws=[num_draws] * len(ladder),
                          num_burnin=[num_burnin] * len(ladder), seed=seed,
                          progress=progress)  # fmt: skip

        c = gp.nll_at_center
        all_betas = np.concatenate([[0.0], ladder])
        means = np.array([prior_values.mean()] + [r.mean for r in rungs])
        se = np.array([prior_values.std(ddof=1) / math.sqrt(len(prior_values))]
                      + [r.mcse for r in rungs])  # fmt: skip
        ess = np.array([float(len(prior_values))] + [r.ess for r in rungs])
        weights = ladder_weights(all_betas)
        value = c + float(weights @ (means - c))
        propagated = float(math.sqrt(np.sum((weights * se) ** 2)))
        chain_means = np.stack([np.full(num_chains, means[0])] + [r.chain_means for r in rungs], 1)
        per_chain = c + (chain_means - c) @ weights
        ok = np.isfinite(per_chain)
        between = (
            float(per_chain[ok].std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() > 1 else math.nan
        )
        integration = _integration_error(all_betas, means - c)
        notes = list(gp.warnings)
        if gp.sampler == "sgld":
            low = [r.beta for r in rungs if r.acceptance < 0.9]
            if low:
                notes.append(
                    "MALA acceptance of the SGLD moves below 0.9 at β = "
                    f"{', '.join(f'{b:.3g}' for b in low)}: the step is too large there for an "
                    "unbiased rung; lower step_scale"
                )
        thin = [r.beta for r in rungs if not r.ess >= MIN_ESS]
        if thin:
            notes.append(
                f"effective sample size below {MIN_ESS} at β = "
                f"{', '.join(f'{b:.3g}' for b in thin)}: the Monte Carlo error there is itself "
                "uncertain; use more draws or chains"
            )
        if any(r.diverged.any() for r in rungs):
            notes.append(f"{int(rungs[-1].diverged.sum())} of {num_chains} chains diverged")
        notes += sampler_notes(rungs, gp.sampler)
        # the larger of the two, or the one there is (a rung of chains that never moved has
        # no MCSE; max(nan, x) was nan)
        mc_error = float(np.nanmax([propagated, between])) if ok.any() else propagated
        if integration > mc_error:
            notes.append(
                f"the integration error ({integration:.2g}) exceeds the Monte Carlo error: use "
                "more rungs (num_rungs)"
            )
        for note in gp.warnings:
            warnings.warn(note, UserWarning, stacklevel=2)
        return FreeEnergyResult(
            free_energy=value,
            mc_error=mc_error,
            integration_error=integration,
            mc_error_propagated=propagated,
            mc_error_between_chains=between,
            betas=all_betas,
            expected_nll=means,
            expected_nll_se=se,
            weights=weights,
            ess=ess,
            step_size=np.array([math.nan] + [r.step_size for r in rungs]),
            top_eigenvalue=np.array([math.nan] + [r.top_eigenvalue for r in rungs]),
            acceptance=np.array([math.nan] + [r.acceptance for r in rungs]),
            per_chain=per_chain,
            nll_at_center=c,
            n=gp.n,
            num_params=gp.num_params,
            prior_std=gp.prior_std,
            prior_mean=gp.prior_mean,
            sampler=gp.sampler,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=num_burnin,
            num_prior_draws=num_prior_draws,
            seed=seed,
            seconds=time.perf_counter() - t0,
            warnings=tuple(notes),
        )


def _integration_error(betas: np.ndarray, g: np.ndarray) -> float:
    """|T - T₂|/3 (T₂ on every other rung) plus the [0, β₁] trapezoid bound (g decreasing).

    With an odd number of intervals above β₁ one of them has no partner; T₂ is then taken
    both ways (keeping β₁'s interval, then 1's) and the larger difference reported, so that
    every interval is checked."""
    fine = ladder_weights(betas) @ g
    last = len(betas) - 1
    body = np.arange(1, last + 1)
    differences = []
    for keep in (body[(body - 1) % 2 == 0], body[(last - body) % 2 == 0]):
        keep = np.union1d(keep, [1, last])  # every other rung, both end points kept
        idx = np.concatenate([[0], keep])
        differences.append(abs(fine - ladder_weights(betas[idx]) @ g[idx]))
    head = betas[1] * abs(g[0] - g[1]) / 2
    return float(max(differences) / 3 + head)
