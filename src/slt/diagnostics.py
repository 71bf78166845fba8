"""Convergence diagnostics for the per-draw λ̂ trace, and the warnings they raise.

Every LLC estimate is a mean of the per-draw trace λ̂_{c,t} = nβ (L_B(w_t) - L_B(w*))
over post-burn-in draws t of usable chains c. :func:`diagnose` reports, for that trace,

- **R̂**: rank-normalized split R̂, the larger of the bulk and folded (tail) versions
  (Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, Bayesian Analysis 16(2)); NaN with
  fewer than two usable chains, where it is undefined.
- **bulk and tail ESS**: effective sample sizes of the rank-normalized split chains, and
  of the indicators of the 5% and 95% quantiles (the smaller), over all usable chains.
- **MCSE** of λ̂: sd / √ESS_mean. The per-draw trace contains the minibatch noise of
  L_B(w_t) - L_B(w*) as well as the sampler's own, so this standard error includes the
  minibatch variability; it is a second estimate, from within the chains, of what
  ``llc_std`` estimates from the spread between chains.
- **drift**: the slope of λ̂ against the draw index (on batch means) and its z-score (see
  :func:`diagnose`), to detect a trace that is still relaxing or sliding downhill.

The numbers come from ``arviz_stats.base.array_stats``, the reference implementation,
imported when first needed. :func:`warnings_for` turns them into warnings with advice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RHAT_MAX = 1.05
"""Warn above this R̂. Vehtari et al. (2021) ask for 1.01 on long runs; λ̂ traces are a few
hundred strongly autocorrelated draws, where R̂ of healthy chains fluctuates more. On
stationary AR(1) traces of 4 chains with total bulk ESS ≈ 200, R̂ exceeded 1.01 in 84% of
400 runs and 1.05 in 2%. 1.05 is also what the Stan documentation for this R̂ recommends."""

MIN_ESS = 100
"""Warn when the bulk ESS, summed over usable chains, is below this. With fewer effective
draws the autocorrelation estimate behind ESS, MCSE and R̂ is itself unreliable, and the
MCSE exceeds sd/10. Vehtari et al. (2021) ask for about 100 per chain, for tail quantiles
too; λ̂ is a mean, so we ask for 100 in all. Healthy runs of ordinary length are far above
it (the README's regression, 4 × 1,500 draws: 600-1,300)."""

MAX_DRIFT_Z = 3.0
"""Warn when the trend of the λ̂ trace is as improbable under stationarity as |z| > 3 of a
normal (2-sided p = 0.27%); ``drift_z`` is that normal deviate (see :func:`diagnose`). On
stationary SGLD λ̂ traces of ``zoo.regular(10)`` (batch 128, calibrate's pilots: 250-2,000
draws, ESS ≈ 30-40 per chain, run past a burn-in of 13-53 e-folds of the softest
direction) |z| > 3 occurred in 0.7% ± 0.15% of 3,200 one-chain pilots and 2.5% ± 0.55% of
800 four-chain ones; at 4 × 1,500 draws in 0.2% ± 0.2% of 500 runs of it, a reduced rank
and a deep linear network (ε = 5e-5). The earlier z, over an ESS-based
standard error, flagged 14-36% and 8-16% of the same pilots: the ESS of a short trace that
is mostly white minibatch noise misses its slow part and came out ~5x too large. Power, on
chains relaxing from w* without burn-in: λ̂ rising from 0.2 to 2.6 over a 250-draw pilot
was flagged in 98% of four-chain pilots but 12% of one-chain ones; a reduced rank and a
deep linear network at ε = 1e-5 (λ̂'s thirds 9.3, 13.3, 13.7 and 6.8, 9.6, 10.0 over
4 × 1,500 draws) in 41% ± 5% and 36% ± 5% of 100 runs each (the ESS-based z: 75% and 80%
of 20), single chains in 0% and 4%. One chain of a few tens of effective draws cannot tell
slow relaxation from slow fluctuation."""

DRIFT_BATCHES = 5
"""Batches per chain behind ``drift_z`` (see :func:`diagnose`). Batch means are independent
only when a batch outlasts the trace's slowest correlation, which a pilot covers only a few
times over: on 1,600 one-chain pilots of ``zoo.regular(10)`` (see MAX_DRIFT_Z) |z| > 3 came
in 1.0% with 5 batches, 2.7% with 8, 11.6% with 16 (0.4% with 4, which leave a single chain
2 degrees of freedom). Fewer batches are honest on shorter traces; more have more power:
on the 4 × 1,500-draw runs above, 5 / 8 / 10 / 15 batches gave 0.2 / 0.4 / 1.6 / 2.4% false
alarms and 41 / 64 / 74 / 90% power on the relaxing reduced rank, but at calibrate's pilot
lengths (250-2,000 draws) 8 batches already gave 1.8-4%. What sets the rate is a batch's
length against the slow correlation time T, which grows as ε shrinks, not the number of
draws: on white-plus-AR(1) traces of 4 × 1,500 with 5 batches, 0.4% at T = 49 draws (the
runs' own), 1.3% at T = 150, 2.3% at T = 250."""

TAIL_PROB = (0.05, 0.95)

BOUND_SLACK = 0.1
""":func:`above_bound` warns when λ̂ exceeds d/2 by more than this fraction of d/2 (and by
more than 3 MCSE). A learning coefficient is at most d/2; SGLD at an ordinary step size
overshoots the tempered posterior's value by a few percent (``zoo.regular(10)``, exact
4.990 under the localized posterior: λ̂ 5.036 over 80 seeds at the defaults), which is
the sampler's known bias, not a failure, and is left to the MALA-acceptance warning."""


@dataclass(frozen=True)
class Diagnostics:
    """Diagnostics of a per-draw λ̂ trace. Scalars are over usable (non-diverged) chains."""

    llc: float  # mean of the trace over usable chains (the estimate λ̂)
    mcse: float  # Monte Carlo standard error of llc: sd / √ess_mean (or of epoch means)
    rhat: float  # rank-normalized split R̂; NaN with fewer than 2 usable chains
    ess_bulk: float  # bulk ESS, total over usable chains
    ess_tail: float  # tail ESS (5% and 95% quantiles, the smaller), total
    ess_mean: float  # ESS of the mean (split chains, no rank normalization), behind mcse
    ess_bulk_per_chain: np.ndarray  # (chain,) bulk ESS of each chain alone, NaN if diverged
    slope: float  # slope of λ̂ per draw, fit to batch means (chain intercepts, common slope)
    drift_z: float  # the slope's t (batch means) as a normal deviate; see diagnose
    llc_first_third: float  # mean over the first third of the draws, usable chains
    llc_last_third: float  # mean over the last third
    diverged: np.ndarray  # (chain,) bool
    num_draws: int
    nbeta: float | None  # nβ behind the trace, if given (used to phrase warnings)
    constant: np.ndarray  # (chain,) bool: usable chains whose trace never changes

    @property
    def num_usable(self) -> int:
        """How many chains did not diverge."""
        return int((~self.diverged).sum())


def _stats():
    from arviz_stats.base import array_stats

    return array_stats


def _trend(x: np.ndarray) -> tuple[float, float]:
    """Common slope of (chain, draw) ``x`` against the draw index, and its z (batch means)."""
    from scipy import stats
    from scipy.special import ndtri_exp

    num_chains, num_draws = x.shape
    batches = np.array_split(np.arange(num_draws), DRIFT_BATCHES)
    means = np.stack([x[:, b].mean(axis=1) for b in batches], axis=1)  # (chain, batch)
    v = np.array([b.mean() for b in batches])
    v -= v.mean()
    centred = means - means.mean(axis=1, keepdims=True)
    svv = num_chains * float(v @ v)
    slope = float((centred @ v).sum() / svv)
    df = num_chains * (DRIFT_BATCHES - 1) - 1
    s2 = float(((centred - slope * v) ** 2).sum()) / df
    if not s2 > 0:
        return slope, math.nan
    t = slope / math.sqrt(s2 / svv)
    # the Student-t tail probability of t, as the normal deviate with the same tail
    return slope, math.copysign(-float(ndtri_exp(stats.t.logsf(abs(t), df))), t)


def diagnose(
    llc_trace: np.ndarray,
    *,
    diverged: np.ndarray | None = None,
    nbeta: float | None = None,
    epoch: tuple[int, int] | None = None,
) -> Diagnostics:
    """R̂, ESS, MCSE and drift of a per-draw λ̂ trace.

    Parameters
    ----------
    llc_trace : array (chain, draw)
        Per-draw λ̂ after burn-in, e.g. ``LLCResult.llc_trace``.
    diverged : array (chain,) of bool, optional
        Chains to leave out (their traces hold NaN/Inf). Default: none.
    nbeta : float, optional
        nβ of the trace; only used to phrase warnings in loss units.
    epoch : (steps, first), optional
        For a trace whose minibatch noise cancels over each epoch of the data (plain SGLD,
        ``control_variate="none"``: the batches partition the data, so their losses at w*
        average to L_n(w*) over an epoch): ``steps`` draws an epoch, the first full one
        starting at draw ``first``. The MCSE is then that of the means of whole epochs
        (batch means of an epoch's length), where there are at least 4 per chain: the ESS of
        the draws takes that noise for white and overstated the MCSE 2-7x.

    Notes
    -----
    **Drift.** Cut each chain into B = ``DRIFT_BATCHES`` consecutive batches and fit their
    means m_{c,k} = a_c + b·t_k by least squares (an intercept per chain, one slope b per
    draw, t_k the batch's mean draw index). With batches longer than the trace's
    correlation the batch means are independent, so t = b̂ / se(b̂), se from the residuals
    of the fit, has a Student-t law with C(B - 1) - 1 degrees of freedom (the batch-means
    method); ``drift_z`` is the normal deviate with the same tail probability, N(0, 1)
    under stationarity. A chain still spreading out from w* (too short a burn-in, too small
    ε·γ) or sliding to lower loss (w* not a minimum) gives a large |drift_z|. An ESS-based
    standard error is not used: on short λ̂ traces, mostly white minibatch noise over a
    slowly relaxing part, it came out several times too small (see ``MAX_DRIFT_Z``).
    ``llc_first_third`` and ``llc_last_third`` describe the same drift in λ̂ units.

    Examples
    --------
    >>> import numpy as np
    >>> trace = np.random.default_rng(0).normal(3.0, 1.0, size=(4, 500))
    >>> d = diagnose(trace)
    >>> round(d.llc, 1), d.rhat < 1.01, 1500 < d.ess_bulk < 2500, abs(d.drift_z) < 3
    (3.0, True, True, True)
    >>> warnings_for(d)
    []
    """
    trace = np.asarray(llc_trace, dtype=np.float64)
    if trace.ndim != 2 or trace.shape[0] == 0:  # no chain: every number would be NaN
        raise ValueError(
            f"llc_trace must be a (chain, draw) array with at least one chain, got shape "
            f"{trace.shape}"
        )
    num_chains, num_draws = trace.shape
    if diverged is None:
        diverged = np.zeros(num_chains, dtype=bool)
    diverged = np.asarray(diverged, dtype=bool)
    if diverged.shape != (num_chains,):
        raise ValueError(
            f"diverged must have shape ({num_chains},) to match llc_trace, got {diverged.shape}"
        )
    ok = ~diverged
    good = trace[ok]
    unmarked = np.flatnonzero(ok & ~np.isfinite(trace).all(axis=1))
    if unmarked.size:
        raise ValueError(
            f"llc_trace has non-finite values in chain(s) {', '.join(map(str, unmarked))}, "
            "which diverged does not mark; pass diverged=res.diverged (or a (chain,) mask "
            "of the chains to leave out)"
        )
    nan = math.nan
    per_chain = np.full(num_chains, nan)
    third = num_draws // 3
    if good.size == 0 or num_draws < 4:
        mean = float(good.mean()) if good.size else nan
        none = np.zeros(num_chains, dtype=bool)
        return Diagnostics(mean, nan, nan, nan, nan, nan, per_chain, nan, nan, nan, nan,
                           diverged, num_draws, nbeta, none)  # fmt: skip
    stats = _stats()
    # a chain that never moves (a constant trace) divides by zero inside R̂: the inf/NaN is
    # warned about by warnings_for, not by numpy. Its ESS comes back as its number of
    # draws; it has no effective draws at all, so its ESS is NaN, and with every chain
    # constant so are the totals and the MCSE
    still = np.zeros(num_chains, dtype=bool)
    still[ok] = np.ptp(good, axis=1) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        per_chain[ok] = stats.ess(good[:, None, :], method="bulk")
        mcse = float(stats.mcse(good, method="mean"))
        rhat = float(stats.rhat(good, method="rank")) if good.shape[0] >= 2 else nan
        ess = [float(stats.ess(good, method="bulk")),
               float(stats.ess(good, method="tail", prob=TAIL_PROB)),
               float(stats.ess(good, method="mean"))]  # fmt: skip
    if epoch is not None:
        steps, first = epoch
        count = (num_draws - first) // steps if steps > 0 else 0
        if count >= 4:
            whole = good[:, first : first + count * steps]
            means = whole.reshape(good.shape[0], count, steps).mean(axis=2)
            with np.errstate(divide="ignore", invalid="ignore"):
                mcse = float(stats.mcse(means, method="mean"))
    per_chain[still] = nan
    if still[ok].all():
        ess, mcse = [nan, nan, nan], nan
    slope, drift_z = _trend(good) if num_draws >= 12 else (nan, nan)
    return Diagnostics(
        llc=float(good.mean()),
        mcse=mcse,
        rhat=rhat,
        ess_bulk=ess[0],
        ess_tail=ess[1],
        ess_mean=ess[2],
        ess_bulk_per_chain=per_chain,
        slope=slope,
        drift_z=drift_z,
        llc_first_third=float(good[:, :third].mean()) if third else nan,
        llc_last_third=float(good[:, num_draws - third :].mean()) if third else nan,
        diverged=diverged,
        num_draws=num_draws,
        nbeta=nbeta,
        constant=still,
    )


def warnings_for(
    diag: Diagnostics,
    *,
    rhat_max: float = RHAT_MAX,
    min_ess: float = MIN_ESS,
    max_drift_z: float = MAX_DRIFT_Z,
    step_too_large: bool = False,
) -> list[str]:
    """Warnings, each with advice, for what ``diag`` shows to be wrong; ``[]`` if nothing.
    ``step_too_large``: other checks (MALA acceptance, λ̂ above d/2) found the step size
    too large, so the advice for a low ESS leaves out a larger one (as divergence does).

    In order: diverged chains; fewer than 4 draws; chains that never moved; a single
    usable chain; λ̂ < 0 (w* is not a local minimum); drift (|drift_z| > ``max_drift_z``);
    bulk ESS < ``min_ess``; R̂ > ``rhat_max``.
    """
    out = []
    if diag.diverged.any():
        bad = ", ".join(str(c) for c in np.flatnonzero(diag.diverged))
        out.append(
            f"chain(s) {bad} diverged (non-finite loss) and are excluded from llc; "
            "the step size is probably too large: try one 3-10x smaller"
        )
    if diag.num_usable and diag.num_draws < 4:
        out.append(
            f"only {diag.num_draws} draw(s) per chain: no R̂, ESS or MCSE (they need at least "
            "4), so nothing checks that the chains mixed; run more draws"
        )
    if diag.constant.any():
        still = ", ".join(str(c) for c in np.flatnonzero(diag.constant))
        out.append(
            f"chain(s) {still} never moved: their λ̂ trace is constant (every MALA proposal "
            "rejected, steps too small to change the loss, or a loss that does not depend on "
            "the parameters: cross-entropy over one output is 0 everywhere), so they sampled "
            "nothing and say nothing about the posterior; use a smaller step size for MALA, "
            "a larger one otherwise, and check that loss_fn varies with the model"
        )
    if diag.num_usable == 1:
        out.append(
            "only one usable chain: no standard error over chains and no R̂ (use num_chains >= 2)"
        )
    if diag.llc < 0:
        gap = ""
        if diag.nbeta:
            gap = f", the sampled loss {-diag.llc / diag.nbeta:.3g} below L_n(w*) on average"
        out.append(
            f"λ̂ = {diag.llc:.4g} ± {diag.mcse:.2g} is negative{gap}: w* is not a local minimum "
            "of L_n and the chains found lower loss nearby. Descend to a minimum first (e.g. "
            "more SGD/Adam steps until the loss stops falling), or check that loss_fn is the "
            "mean per-sample NLL of the model at w*"
        )
    if abs(diag.drift_z) > max_drift_z:
        if diag.slope > 0:
            advice = (
                "the chains are still spreading out from w*. Use a longer num_burnin (flat "
                "directions relax over ~2/(ε·γ) steps), a larger step_size ε or localization γ"
            )
        else:
            advice = (
                "the chains are still finding lower loss, so w* is probably not a minimum. "
                "Descend further first (e.g. more SGD/Adam steps), or use a longer num_burnin"
            )
        out.append(
            f"the λ̂ trace is not stationary: it {'rises' if diag.slope > 0 else 'falls'} from "
            f"{diag.llc_first_third:.4g} (first third of the draws) to "
            f"{diag.llc_last_third:.4g} (last third), trend z = {diag.drift_z:.1f}: {advice}"
        )
    if diag.ess_bulk < min_ess:
        if step_too_large or diag.diverged.any():  # never advise both ways at once
            advice = "Run more draws or chains (not a larger step_size: it is too large already)"
        else:
            advice = (
                "Run more draws or chains, or a larger step_size (faster mixing; watch for "
                "divergences and bias)"
            )
        out.append(
            f"low effective sample size: bulk ESS {diag.ess_bulk:.0f} < {min_ess:g} over "
            f"{diag.num_usable} chain(s) × {diag.num_draws} draws, so λ̂ and its error bars rest "
            f"on few independent draws. {advice}"
        )
    if diag.rhat > rhat_max:
        out.append(
            f"R̂ = {diag.rhat:.3f} > {rhat_max:g}: the chains disagree with each other, so they "
            "have not mixed. Run longer (num_burnin, num_draws), or use a larger localization "
            "so every chain samples the same neighbourhood of w*"
        )
    return out


def above_bound(llc_per_chain: np.ndarray, llc: float, mcse: float, num_params: int) -> list[str]:
    """A warning if λ̂ is above d/2, the largest learning coefficient of ``num_params``.

    λ ≤ d/2 for a loss smooth at w*: near w* the loss rises no faster than a quadratic, so
    the volume of {L_n < L_n(w*) + t} shrinks no faster than t^(d/2). λ̂ above d/2 by more
    than ``BOUND_SLACK`` of it and 3 MCSE means the chains are not sampling the tempered
    posterior: a step size too large for SGLD/SGNHT (which inflate its spread), or chains
    blowing up whose loss has not yet overflowed (a non-finite loss would have marked them
    diverged). Chains above d, twice the bound, are named.
    """
    bound = num_params / 2
    high = np.flatnonzero(np.nan_to_num(llc_per_chain, nan=-math.inf) > 2 * bound)
    excess = llc - bound
    significant = excess > BOUND_SLACK * bound and not excess <= 3 * mcse
    if not (significant or high.size):
        return []
    message = (
        f"λ̂ = {llc:.4g} is above d/2 = {bound:g}, the largest learning coefficient a model "
        f"with d = {num_params} sampled parameters can have (for a loss smooth at w*)"
    )
    if high.size:
        values = ", ".join(f"{llc_per_chain[c]:.3g}" for c in high)
        message += (
            f"; chain(s) {', '.join(str(c) for c in high)} (λ̂ {values}) are above even "
            "d, twice the bound"
        )
    return [
        message + ". The chains are not sampling the tempered posterior: with SGLD or "
        "SGNHT the step size is too large (it inflates the posterior's spread); use one "
        '3-10x smaller or step_size="auto"'
    ]
