"""Choose the SGLD step size ε from short pilot chains, by measurable criteria.

The stiffest posterior direction has precision P_max ≈ nβ q_max + γ, with q_max the top
eigenvalue of the Hessian of L_n at w* (power iteration on Hessian-vector products).
Full-batch SGLD on a Gaussian direction of precision P has stationary variance
1/(P(1 - εP/4)) (exact; see tests/test_llc_statistics.py), so the grid starts where
that inflation is ``max_stiff_bias`` in the stiffest direction, ε₀ = 4·max_stiff_bias/P_max,
and halves. From the largest ε down, each candidate runs a short pilot and must pass:

1. no diverged chain;
2. a stationary post-burn-in λ̂ trace (no significant trend: slt.diagnostics' drift test,
   about 1% false alarms on pilots; with one pilot chain it sees only gross drift);
3. the stiffness where the pilot chains went, ε(nβ q + γ)/4 with q the top Hessian
   eigenvalue at the pilot's last draw, within 1.5 × ``max_stiff_bias`` (a singular model
   is flat at w* and stiff away from it);
4. MALA acceptance of the SGLD moves ≥ ``min_acceptance`` (Furman & Lau 2024,
   arXiv 2402.03698): a move MALA would often reject is a move SGLD makes with bias;
5. minibatch gradient noise small against the injected noise: the ratio
   ε nβ² Var[∇L_B]/4 (per coordinate, measured from minibatch gradients at w*; THEORY.md)
   ≤ ``max_noise_ratio`` — checked only without the gradient control variate, which
   removes most of that noise near w*;
6. λ̂ flat as ε shrinks: λ̂ at this ε and at the next smaller one agree within
   ``flat_tolerance`` (relative) plus two Monte Carlo standard errors (ESS-based). If
   two standard errors alone exceed ``flat_tolerance`` the pilots cannot tell, the
   comparison is marked inconclusive, and the stiffness bound (3) decides alone.

The chosen ε is the largest candidate that passes 1-5 and whose next-smaller neighbour
also passes 1-5 without contradicting it (6). Without such a pair (the budget ran out)
it is the smallest candidate that passed 1-5. The pilots use
the same nβ, γ, sampler and control variate as the estimate they serve.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from slt import _checks, _globals
from slt._text import right
from slt.curvature import minibatch_gradient_variance, top_hessian_eigenvalue
from slt.losses import LossFn
from slt.samplers import FULL_BATCH, SAMPLERS


@dataclass(frozen=True)
class Candidate:
    """One step size tried by the calibration."""

    step_size: float
    llc: float
    llc_std: float
    diverged: bool
    acceptance: float  # mean MALA acceptance of the pilot's SGLD moves (NaN if unmeasured)
    noise_ratio: float  # ε nβ² Var[∇L_B] / 4 at w*
    stiffness: float  # ε P / 4 with P = nβ q_max + γ at the pilot's last draw
    stationary: bool
    flat: bool | None  # agrees with the next smaller ε (None: not compared)
    passed: bool  # criteria 1-4
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen step size and every candidate tried, largest ε first."""

    step_size: float
    candidates: tuple[Candidate, ...]
    top_hessian_eigenvalue: float
    gradient_variance: float  # per coordinate, of the minibatch gradient at w*
    nbeta: float
    localization: float
    settings: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    confirmed: bool = False  # a smaller neighbour was run and did not contradict the choice
    grid: tuple = ()  # SettingTrial per (γ, nβ) when calibrate was given grids of them

    def to_dict(self) -> dict:
        out = asdict(self)
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    def __str__(self) -> str:
        head = (
            f"{'step_size':>10} {right('λ̂ ± se', 18)} {'accept':>7} {'noise':>7} {'εP/4':>6} "
            f"{'stat.':>5} {'flat':>5} {'ok':>3}  reasons"
        )
        lines = [
            f"Calibration: step_size = {self.step_size:.3g}  (nβ {self.nbeta:.4g}, "
            f"γ {self.localization:g}, top Hessian eigenvalue {self.top_hessian_eigenvalue:.3g}, "
            f"{self.seconds:.1f} s)",
            head,
        ]
        for c in self.candidates:
            flat = "-" if c.flat is None else ("yes" if c.flat else "no")
            mark = " <" if c.step_size == self.step_size else ""
            lines.append(
                f"{c.step_size:>10.3g} {c.llc:>9.4g} ± {c.llc_std:<6.2g} {c.acceptance:>7.3f} "
                f"{c.noise_ratio:>7.3f} {c.stiffness:>6.3f} {'yes' if c.stationary else 'no':>5} "
                f"{flat:>5} "
                f"{'yes' if c.passed else 'no':>3}  {'; '.join(c.reasons)}{mark}"
            )
        if self.grid:
            from slt.calibrate_grid import grid_table

            lines += ["", "localization γ and nβ:", *grid_table(self.grid)]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self):
        """λ̂ (± 2 se) and MALA acceptance against ε; returns the matplotlib Figure. A
        candidate without λ̂ (its chains diverged) is a red x at the bottom edge."""
        from slt.plots import _pyplot, mark_missing

        plt = _pyplot()
        eps = np.array([c.step_size for c in self.candidates])
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5), sharex=True)
        llc = np.array([c.llc for c in self.candidates], dtype=float)
        top.errorbar(eps, llc, yerr=[2 * c.llc_std for c in self.candidates], fmt="o-", capsize=3)
        lost = ~np.isfinite(llc)
        if lost.any():  # in the table, so on the plot too
            mark_missing(top, eps[lost], "no λ̂ (diverged)")
        top.axvline(self.step_size, color="tab:green", ls="--", label="chosen")
        top.set(ylabel="λ̂ (± 2 se)", xscale="log", title="step-size calibration")
        top.legend(fontsize=8)
        bottom.plot(eps, [c.acceptance for c in self.candidates], "o-")
        bottom.axvline(self.step_size, color="tab:green", ls="--")
        bottom.set(xlabel="step size ε", ylabel="MALA acceptance", xscale="log", ylim=(0, 1.05))
        fig.tight_layout()
        return fig


def _stationary(llc_trace: np.ndarray, diverged: np.ndarray) -> bool:
    """No drift in the per-draw λ̂: |drift_z| ≤ slt.diagnostics.MAX_DRIFT_Z (batch means)."""
    from slt.diagnostics import MAX_DRIFT_Z, diagnose

    z = diagnose(llc_trace, diverged=diverged).drift_z
    return not (abs(z) > MAX_DRIFT_Z)


def calibrate(
    model,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    step_sizes: Sequence[float] | None = None,
    n: int | None = None,
    nbeta: float | Sequence[float] | None = None,
    localization: float | Sequence[float] = 1.0,
    sampler: str = "sgld",
    control_variate: str = "gradient",
    num_chains: int = 1,
    num_draws: int = 250,
    num_burnin: int | None = None,
    max_stiff_bias: float = 0.01,
    min_acceptance: float = 0.98,
    max_noise_ratio: float = 0.1,
    flat_tolerance: float = 0.05,
    num_candidates: int = 4,
    max_pilot_steps: int | None = None,
    grid_chains: int = 4,
    grid_draws: int = 1000,
    params=None,
    microbatch: int | str | None = "auto",
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Pick the largest step size that passes the criteria of this module's docstring.

    ``step_sizes`` (descending after sorting) overrides the grid
    4·max_stiff_bias/P_max · 2^-k, k < ``num_candidates``. The k-th candidate's pilot runs
    ``num_chains`` chains of ``2^k × (num_burnin + num_draws)`` steps, so every pilot covers
    the same diffusion time ε·steps and λ̂(ε) and λ̂(ε/2) are compared at equal mixing.
    The search stops at the first candidate confirmed by its neighbour, or before a
    candidate whose pilot would take the total past ``max_pilot_steps`` (all chains).

    ``localization`` and ``nbeta`` may be sequences: the step size is then calibrated at
    every (γ, nβ) and the setting chosen by the rules of :mod:`slt.calibrate_grid` (the
    largest γ that leaves λ̂ unchanged; the smallest nβ from which λ̂ has levelled off).
    The settings are compared on ``grid_chains`` chains × ``grid_draws`` draws each, all
    with the same seed and the same reduced step ε·nβ (the smallest chosen), so that the
    differences of λ̂ between settings are paired and their standard errors small. The
    result is the chosen setting's calibration, its ``localization`` and ``nbeta`` the
    choice, with every setting tried in ``grid``.

    ``microbatch`` draws the pilots' batches as whole micro-batches and reads their control
    variates from a table, as :func:`slt.estimate_llc` does with it (the same partition for
    the same ``seed``; "auto", the default, where it would), so the pilots sample the
    estimate's own chain.

    Examples
    --------
    >>> import slt
    >>> case = slt.zoo.regular(4, n=512)
    >>> cal = slt.calibrate(case.model, case.loader(), case.loss_fn, progress=False)
    >>> 0 < cal.step_size <= 0.08 / (cal.nbeta * cal.top_hessian_eigenvalue)
    True
    """
    from slt.calibrate_grid import as_grid, calibrate_grid
    from slt.chains import DivergenceError
    from slt.sampling import build_posterior, sample_llc

    start = time.perf_counter()
    microbatch = _checks.microbatch(microbatch)
    num_chains = _checks.integer("num_chains", num_chains, minimum=1)
    num_draws = _checks.integer("num_draws", num_draws, minimum=4)
    if num_burnin is not None:
        num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    # εP/4 = max_stiff_bias sets the first step; the inflation 1/(1 - εP/4) needs it < 1
    max_stiff_bias = _checks.real("max_stiff_bias", max_stiff_bias, minimum=0, strict=True,
                                  maximum=1, strict_max=True)  # fmt: skip
    min_acceptance = _checks.real("min_acceptance", min_acceptance, minimum=0, maximum=1)
    max_noise_ratio = _checks.real("max_noise_ratio", max_noise_ratio, minimum=0, strict=True)
    flat_tolerance = _checks.real("flat_tolerance", flat_tolerance, minimum=0, strict=True)
    num_candidates = _checks.integer("num_candidates", num_candidates, minimum=1)
    if max_pilot_steps is not None:
        max_pilot_steps = _checks.integer("max_pilot_steps", max_pilot_steps, minimum=1)
    grid_chains = _checks.integer("grid_chains", grid_chains, minimum=1)
    grid_draws = _checks.integer("grid_draws", grid_draws, minimum=4)
    seed = _checks.seed(seed)
    _checks.choice("sampler", sampler, SAMPLERS)
    if step_sizes is not None:
        step_sizes = _checks.positive_reals("step_sizes", step_sizes)
        if len(set(step_sizes)) < len(step_sizes):  # a candidate would confirm itself (6)
            raise ValueError(f"step_sizes must be distinct, got {step_sizes!r}")
    gammas, nbetas = as_grid("localization", localization), as_grid("nbeta", nbeta)
    if gammas is None and localization is not None:  # one value: numpy scalars as floats
        localization = _checks.real("localization", localization, minimum=0)
    if nbetas is None and nbeta is not None:
        nbeta = _checks.real("nbeta", nbeta, minimum=0, strict=True)
    if gammas is not None or nbetas is not None:
        options = dict(step_sizes=step_sizes, n=n, sampler=sampler,
                       control_variate=control_variate, num_chains=num_chains,
                       num_draws=num_draws, num_burnin=num_burnin,
                       max_stiff_bias=max_stiff_bias, min_acceptance=min_acceptance,
                       max_noise_ratio=max_noise_ratio, flat_tolerance=flat_tolerance,
                       num_candidates=num_candidates, max_pilot_steps=max_pilot_steps,
                       params=params, microbatch=microbatch, seed=seed,
                       progress=progress)  # fmt: skip

        def calibrate_at(gamma: float, nb: float | None) -> CalibrationResult:
            return calibrate(model, loader, loss_fn, localization=gamma, nbeta=nb, **options)

        def sample_at(gamma: float, nb: float, eps: float, burnin: int):
            posterior = build_posterior(model, loader, loss_fn, n=n, nbeta=nb,
                                        localization=gamma, sampler=sampler, params=params,
                                        control_variate="none" if sampler == "mala"
                                        else control_variate, microbatch=microbatch,
                                        seed=seed)  # fmt: skip
            try:
                return sample_llc(posterior, sampler=sampler, step_size=eps,
                                  num_chains=grid_chains, num_draws=grid_draws,
                                  num_burnin=burnin, seed=seed, acceptance_every=0)  # fmt: skip
            except DivergenceError:
                return None

        with _globals.private(seed):  # the grid's own runs (sample_at) draw from it too
            res, trials, notes = calibrate_grid(
                calibrate_at, sample_at, gammas or [localization], nbetas or [nbeta],
                flat_tolerance=flat_tolerance,
            )  # fmt: skip
        return _replace(res, grid=trials, warnings=res.warnings + notes,
                        seconds=time.perf_counter() - start)  # fmt: skip
    if sampler == "mala":
        control_variate = "none"
    with _globals.private(seed):  # what user code draws from it repeats with seed
        posterior = build_posterior(model, loader, loss_fn, n=n, nbeta=nbeta,
                                    localization=localization, control_variate=control_variate,
                                    sampler=sampler, params=params, microbatch=microbatch,
                                    seed=seed)  # fmt: skip
        return calibrate_posterior(
            posterior, sampler=sampler, step_sizes=step_sizes, num_chains=num_chains,
            num_draws=num_draws, num_burnin=num_burnin, max_stiff_bias=max_stiff_bias,
            min_acceptance=min_acceptance, max_noise_ratio=max_noise_ratio,
            flat_tolerance=flat_tolerance, num_candidates=num_candidates,
            max_pilot_steps=max_pilot_steps, seed=seed, start=start,
        )  # fmt: skip


def calibrate_posterior(
    posterior,
    *,
    sampler: str,
    step_sizes: Sequence[float] | None,
    num_chains: int,
    num_draws: int,
    num_burnin: int | None,
    max_stiff_bias: float,
    min_acceptance: float,
    max_noise_ratio: float,
    flat_tolerance: float,
    num_candidates: int,
    max_pilot_steps: int | None,
    seed: int,
    start: float | None = None,
) -> CalibrationResult:
    """:func:`calibrate` at one (γ, nβ) on a built :class:`slt.posterior.Posterior` (its
    nβ, γ, control variate and micro-batches), which ``estimate_llc(step_size="auto")``
    then samples itself: the pass over the data at w* and its tables are made once. The
    options are :func:`calibrate`'s (its defaults: :func:`pilot_defaults`). The pilots
    leave the posterior's chain parameters at their last draw; samplers start from
    ``reset()``."""
    from slt.chains import DivergenceError
    from slt.sampling import sample_llc

    start = time.perf_counter() if start is None else start
    control_variate = posterior.control_variate
    nb, gamma = posterior.nbeta, posterior.localization
    probe = next(posterior.batches.forever(torch.Generator().manual_seed(seed)))
    q_max = top_hessian_eigenvalue(posterior, probe, seed=seed)
    grad_var = minibatch_gradient_variance(posterior, seed=seed)
    scale = 0.1 if sampler == "rmsprop_sgld" else 1.0  # its preconditioner reaches 1/δ = 10

    def stiff_limit(q: float) -> float:  # ε with εP/4 = max_stiff_bias
        return scale * 4 * max_stiff_bias / (nb * q + gamma) if nb * q + gamma > 0 else math.inf

    if step_sizes is None:
        if not math.isfinite(stiff_limit(q_max)):
            raise ValueError(
                "calibrate: L_n is flat at w* and localization is 0, so there is no stiffness "
                "to start the grid from; pass step_sizes (estimate_llc: a number as step_size)"
            )
        grid = None
        eps = stiff_limit(q_max)
    else:
        grid = sorted(step_sizes, reverse=True)  # checked by calibrate
        eps = grid[0]
    first = eps
    if num_burnin is None:  # the stiff directions relax 20 e-folds at the first candidate
        num_burnin = max(50, math.ceil(20 * scale / (eps * (nb * q_max + gamma))))
    # full-batch samplers (MALA) have no minibatch noise to check
    check_noise = control_variate != "gradient" and sampler not in FULL_BATCH

    def trial(eps: float, stretch: int) -> tuple[Candidate, float]:
        noise = eps * nb**2 * grad_var / 4
        try:
            res = sample_llc(posterior, sampler=sampler, step_size=eps, num_chains=num_chains,
                             num_draws=num_draws * stretch, num_burnin=num_burnin * stretch,
                             seed=seed)  # fmt: skip
        except DivergenceError:
            cand = Candidate(eps, math.nan, math.nan, True, math.nan, noise, math.inf, False,
                             None, False, ("all chains diverged",))  # fmt: skip
            return cand, math.nan
        finite = all(bool(torch.isfinite(p).all()) for p in posterior.params.values())
        q_here = top_hessian_eigenvalue(posterior, probe, iters=10, seed=seed, at_center=False)
        q_here = q_here if finite else math.nan
        stiffness = eps * (nb * max(q_here, q_max) + gamma) / 4 / scale if finite else math.inf
        acceptance = float(res.mala_acceptance)
        stationary = _stationary(res.llc_trace, res.diverged)
        reasons = []
        if res.diverged.any():
            reasons.append("divergence")
        if not stationary:
            reasons.append("non-stationary")
        if stiffness > max_stiff_bias * 1.5:  # the chains found stiffer regions than w*
            reasons.append(f"εP/4 = {stiffness:.2f} where the chains went")
        if math.isfinite(acceptance) and acceptance < min_acceptance:
            reasons.append(f"acceptance {acceptance:.2f} < {min_acceptance:g}")
        if check_noise and noise > max_noise_ratio:
            reasons.append(f"gradient noise ratio {noise:.2f} > {max_noise_ratio:g}")
        se = res.mcse if math.isfinite(res.mcse) else res.llc_std
        cand = Candidate(eps, res.llc, se, bool(res.diverged.any()), acceptance, noise,
                         stiffness, stationary, None, not reasons, tuple(reasons))  # fmt: skip
        return cand, q_here

    if grid is not None and max_pilot_steps is None and first / grid[-1] > LONG_PILOTS:
        worst = round(first / grid[-1]) * num_chains * (num_burnin + num_draws)
        warnings.warn(
            f"calibrate: step_sizes span {first:.3g} to {grid[-1]:.3g}; every pilot covers the "
            f"diffusion time of the first, so the pilot at {grid[-1]:.3g} would run {worst:,} "
            "chain-steps if the search reaches it. Pass max_pilot_steps to cap the total, or "
            "a narrower grid",
            UserWarning,
            stacklevel=3,
        )
    tried, chosen, spent, confirmed, notes = _search(
        trial, first, grid, num_candidates=num_candidates, max_pilot_steps=max_pilot_steps,
        steps_per_stretch=num_chains * (num_burnin + num_draws), flat_tolerance=flat_tolerance,
    )  # fmt: skip
    return CalibrationResult(
        step_size=chosen,
        candidates=tuple(tried),
        top_hessian_eigenvalue=q_max,
        gradient_variance=grad_var,
        nbeta=nb,
        localization=gamma,
        settings={
            "sampler": sampler,
            "control_variate": control_variate,
            "num_chains": num_chains,
            "num_draws": num_draws,
            "num_burnin": num_burnin,
            "seed": seed,
            "microbatch": posterior.microbatch,
            "max_stiff_bias": max_stiff_bias,
            "min_acceptance": min_acceptance,
            "max_noise_ratio": max_noise_ratio,
            "flat_tolerance": flat_tolerance,
            "pilot_steps": spent,
        },
        warnings=tuple(notes),
        seconds=time.perf_counter() - start,
        confirmed=confirmed,
    )


LONG_PILOTS = 64
"""A ``step_sizes`` grid whose first is more than this many times its last, with no
``max_pilot_steps``, is warned of before any pilot runs (the last pilot's length)."""


def pilot_defaults() -> dict:
    """:func:`calibrate`'s defaults of the options :func:`calibrate_posterior` takes."""
    wanted = inspect.signature(calibrate_posterior).parameters
    return {
        name: p.default
        for name, p in inspect.signature(calibrate).parameters.items()
        if name in wanted and p.default is not inspect.Parameter.empty
    }


def _search(
    trial: Callable[[float, int], tuple[Candidate, float]],
    first: float,
    grid: list[float] | None,
    *,
    num_candidates: int,
    max_pilot_steps: int | None,
    steps_per_stretch: int,
    flat_tolerance: float,
) -> tuple[list[Candidate], float, int, bool, list[str]]:
    """Walk the candidates from the largest ε down (``grid``, or ``first``·2^-k) and stop
    at the first passing candidate that its passing neighbour confirms (criterion 6) or
    before the pilot budget runs out. Returns (candidates tried, chosen ε, pilot steps
    spent, whether a neighbour confirmed the choice, warnings)."""
    tried: list[Candidate] = []
    chosen = None
    spent = 0
    for k in range(len(grid) if grid is not None else num_candidates):
        eps = grid[k] if grid is not None else first * 2.0**-k
        stretch = max(1, round(first / eps))
        cost = stretch * steps_per_stretch
        if tried and max_pilot_steps is not None and spent + cost > max_pilot_steps:
            break
        spent += cost
        cand, _ = trial(eps, stretch)
        if tried and tried[-1].passed and cand.passed:
            prev = tried[-1]
            noise = 2 * math.hypot(prev.llc_std, cand.llc_std)
            if noise > flat_tolerance * abs(cand.llc):  # the pilots cannot resolve a change:
                # the stiffness bound (3) stands alone
                chosen = prev.step_size
                tried[-1] = _replace(prev, reasons=prev.reasons + ("comparison inconclusive",))
                tried.append(cand)
                break
            flat = abs(prev.llc - cand.llc) <= flat_tolerance * abs(cand.llc) + noise
            change = () if flat else (f"λ̂ changes by {abs(prev.llc / cand.llc - 1):.0%}",)
            tried[-1] = _replace(prev, flat=flat, passed=flat, reasons=prev.reasons + change)
            if flat:
                chosen = prev.step_size
                tried.append(cand)
                break
        tried.append(cand)
    notes = []
    if max_pilot_steps is not None and spent > max_pilot_steps:  # the first always runs
        notes.append(
            f"the first candidate's pilot took {spent:,} chain-steps, over the budget of "
            f"{max_pilot_steps:,} (max_pilot_steps; with step_size='auto' a fifth of the "
            "estimate's steps): it runs whatever the budget"
        )
    confirmed = chosen is not None
    if chosen is None:
        # Without a confirmed pair (the budget ran out), the smallest candidate that passed
        # 1-5 is the safe choice: every pilot covers the same diffusion time.
        passing = [c for c in tried if c.passed]
        usable = [c for c in tried if not c.diverged]
        if not usable:  # never a step its own pilot saw diverge
            from slt.chains import DivergenceError

            raise DivergenceError(
                f"calibration: every candidate step size diverged in its pilot "
                f"({', '.join(f'{c.step_size:.3g}' for c in tried)}; the pilot budget held "
                f"{len(tried)}); pass a step size below {tried[-1].step_size / 2:.3g}, more "
                "pilot steps (max_pilot_steps, or a longer estimate), or a larger localization"
            )
        chosen = (passing[-1] if passing else usable[-1]).step_size
        if not passing:
            notes.append(
                f"no step size passed the criteria; using {chosen:.3g} — treat the estimate "
                "with care (a larger localization, or more pilot steps, may help)"
            )
    return tried, chosen, spent, confirmed, notes


def _replace(c: Candidate, **changes) -> Candidate:
    from dataclasses import replace

    return replace(c, **changes)
