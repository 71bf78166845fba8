"""WBIC: the free energy from one temperature, and λ from two.

WBIC = E_β[n L_n(w)] at β = 1/log n under the global tempered posterior
p_β(w) ∝ φ(w) exp(-nβ L_n(w)) (Watanabe 2013, "A widely applicable Bayesian information
criterion", JMLR 14, Theorem 4 and Definition 2). It has the asymptotic expansion of the
Bayes free energy up to its O(√log n) fluctuation, F_n = n L_n(w0) + λ log n -
(m - 1) log log n + O_p(1) and WBIC = n L_n(w0) + λ log n + O_p(√log n), with no λ, m or
Hessian needed. Since E_β[n L_n] = n L_n(w0) + λ/β + O_p(√(1/β)), two temperatures give a
global learning coefficient (Watanabe 2013, Corollary 3):

    λ̂ = (E_{β₁}[n L_n] - E_{β₂}[n L_n]) / (1/β₁ - 1/β₂).
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
from slt.diagnostics import MIN_ESS
from slt.evidence._ladder import GlobalPosterior, sampler_notes, warm_starts
from slt.evidence._result import ToDict
from slt.losses import LossFn


@dataclass(frozen=True)
class WBICResult(ToDict):
    """WBIC at β = 1/log n, E_{β₂}[n L_n] at a second temperature, and the global λ̂."""

    wbic: float  # E_β[n L_n] at β (default 1/log n)
    wbic_se: float  # Monte Carlo standard error: max(ESS-based, between chains)
    beta: float
    expected_nll2: float  # E_{β₂}[n L_n]
    expected_nll2_se: float
    beta2: float
    lambda_hat: float  # (E_β - E_β₂) / (1/β - 1/β₂)
    lambda_se: float
    wbic_per_chain: np.ndarray  # (chain,)
    lambda_per_chain: np.ndarray  # (chain,)
    ess: float  # of the WBIC mean
    nll_at_center: float  # n L_n(w*), w* the model's parameters
    n: int
    num_params: int
    prior_std: float | None  # None: flat prior
    prior_mean: float
    sampler: str
    step_size: float  # ε at β
    step_size2: float  # ε at β₂
    acceptance: float  # mean MALA acceptance of the moves at β
    num_chains: int
    num_draws: int
    num_burnin: int
    num_anneal: int
    seed: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def bic_at_center(self) -> float:
        """n L_n(w*) + (d/2) log n: BIC if w* minimizes L_n."""
        return self.nll_at_center + 0.5 * self.num_params * math.log(self.n)

    def __str__(self) -> str:
        prior = "flat" if self.prior_std is None else f"N({self.prior_mean:g}, {self.prior_std:g}²)"
        lines = [
            f"WBIC = {self.wbic:.8g} ± {self.wbic_se:.2g}  (E_β[n L_n] at β = {self.beta:.4g}"
            f"{' = 1/log n' if abs(self.beta * math.log(self.n) - 1) < 1e-12 else ''})",
            f"  λ̂ = {self.lambda_hat:.4g} ± {self.lambda_se:.2g} from β₂ = {self.beta2:.4g} "
            f"(E = {self.expected_nll2:.8g} ± {self.expected_nll2_se:.2g});  d/2 = "
            f"{self.num_params / 2:g}",
            f"  n {self.n}, d {self.num_params}, prior {prior}, {self.sampler} "
            f"ε {self.step_size:.3g} (accept {self.acceptance:.3f}), "
            f"{self.num_chains} chains × {self.num_draws} draws, "
            f"ESS {self.ess:.0f}, {self.seconds:.1f} s",
            f"  n L_n(w*) {self.nll_at_center:.8g}   n L_n(w*) + (d/2) log n "
            f"{self.bic_at_center:.8g}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def wbic(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    beta: float | None = None,
    beta2: float | None = None,
    prior_std: float | None = 1.0,
    prior_mean: float = 0.0,
    sampler: str = "auto",
    step_scale: float | None = None,
    control_variate: str = "gradient",
    num_chains: int = 8,
    num_draws: int = 400,
    num_burnin: int = 200,
    num_anneal: int = 6,
    seed: int = 0,
    progress: bool = True,
) -> WBICResult:
    """WBIC = E_β[n L_n(w)] at β = 1/log n, with its standard error, and λ̂ from two β.

    The expectation is over the global tempered posterior p_β(w) ∝ φ(w) exp(-nβ L_n(w))
    (Watanabe 2013, JMLR 14, Definition 2): WBIC - F_n = O_p(√log n) for regular and
    singular models alike, where BIC's (d/2) log n is wrong for singular ones. A second
    temperature β₂ gives the global learning coefficient (Watanabe 2013, Corollary 3)

        λ̂ = (E_β[n L_n] - E_β₂[n L_n]) / (1/β - 1/β₂).

    Chains start from prior draws carried up ``num_anneal`` rungs below β (a singular
    posterior is wide along its minimizer set: chains started at one point would need
    ~2σ²/ε steps to spread over it), then sample β and, warm-started from there, β₂.
    With ``prior_std=None`` (flat prior) they start at w*.

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters w* give n L_n(w*) for reference and, with a flat prior, the start.
    loader, loss_fn : as for :func:`slt.estimate_llc` (mean per-sample NLL).
    n : int, optional
    beta : float, optional
        Default 1/log n (n ≥ 3).
    beta2 : float, optional
        Default min(2β, 1), and β/2 from β = 1 (β₂ must differ from β). λ̂'s bias from the
        O(1/√β) term shrinks as β₂ → β, its variance grows.
    prior_std, prior_mean : float
        φ = N(μ, σ² I); ``prior_std=None`` is the flat prior (no prior term: the target is
        exp(-nβ L_n) alone, proper only if that is integrable).
    sampler : {"auto", "mala", "sgld"}
        "auto": MALA (exact at any step size) when the whole dataset is available as one
        batch (a ``DataLoader`` over a ``TensorDataset``), else SGLD.
    step_scale : float, optional
        ε_β = step_scale / (nβ q + 1/σ²), q the largest Hessian eigenvalue of L_n at the
        chains' starting points and w*; default 2.5 for MALA (also / d^(1/3)), 0.04 for
        SGLD.
    control_variate : as for :func:`slt.estimate_llc` (SGLD only).
    num_chains, num_draws, num_burnin : int
        Per temperature; ``num_burnin`` is also the length of each annealing rung.
    num_anneal : int
        Annealing rungs between the prior and β (0: start at the prior draws).
    seed, progress

    Examples
    --------
    >>> import math, torch, slt
    >>> case = slt.zoo.regular(2, n=256)
    >>> res = wbic(case.model, case.loader(), case.loss_fn, prior_std=None, num_chains=4,
    ...            num_draws=200, num_burnin=50, progress=False)
    >>> abs(res.wbic - res.bic_at_center) < 5 * res.wbic_se   # exact for this model
    True
    """
    t0 = time.perf_counter()
    num_chains = _checks.integer("num_chains", num_chains, minimum=2)
    num_draws = _checks.integer("num_draws", num_draws, minimum=4)
    num_burnin = _checks.integer("num_burnin", num_burnin, minimum=0)
    num_anneal = _checks.integer("num_anneal", num_anneal, minimum=0)
    seed = _checks.seed(seed)
    with _globals.private(seed):  # what user code draws from it repeats with seed
        gp = GlobalPosterior(model, loader, loss_fn, n=n, prior_std=prior_std,
                             prior_mean=prior_mean, sampler=sampler,
                             control_variate=control_variate, step_scale=step_scale)  # fmt: skip
        if beta is None:
            if gp.n < 3:
                raise ValueError(f"the default β = 1/log n needs n >= 3, got n = {gp.n}")
            beta = 1.0 / math.log(gp.n)
        beta = _checks.real("beta", beta, minimum=0, strict=True)
        if beta2 is None:
            beta2 = min(2 * beta, 1.0) if beta < 1 else beta / 2
        beta2 = _checks.real("beta2", beta2, minimum=0, strict=True)
        if beta2 == beta:
            raise ValueError(f"beta2 must differ from beta = {beta:g}")
        starts, _ = warm_starts(gp, num_chains=num_chains, beta=min(beta, beta2),
                                num_anneal=num_anneal, num_burnin=num_burnin, seed=seed,
                                progress=progress)  # fmt: skip
        rungs, _ = gp.run(starts, [beta, beta2], num_draws=[num_draws] * 2,
                          num_burnin=[num_burnin] * 2, seed=seed, progress=progress)  # fmt: skip
        first, second = rungs
        scale = 1.0 / beta - 1.0 / beta2
        lam_chain = (first.chain_means - second.chain_means) / scale
        ok = np.isfinite(lam_chain)  # the chains that finished both rungs
        if ok.all():
            lam = (first.mean - second.mean) / scale
        else:  # over matching chains, or a chain lost at one rung would shift the difference
            lam = float(lam_chain[ok].mean()) if ok.any() else math.nan

        def sd_chains(x: np.ndarray) -> float:
            return float(x[ok].std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() > 1 else math.nan

        lam_se = np.nanmax([math.hypot(first.mcse, second.mcse) / abs(scale), sd_chains(lam_chain)])
        wbic_se = np.nanmax([first.mcse, sd_chains(first.chain_means)])
        notes = list(gp.warnings)
        if gp.sampler == "sgld" and first.acceptance < 0.9:
            notes.append(
                f"MALA acceptance of the SGLD moves {first.acceptance:.2f} < 0.9: the step is too "
                "large for an unbiased WBIC; lower step_scale"
            )
        if not first.ess >= MIN_ESS:
            notes.append(
                f"effective sample size {first.ess:.0f} < {MIN_ESS}: the standard error is itself "
                "uncertain; use more draws or chains"
            )
        # a rung's record is cumulative: a chain lost at β never ran at β₂
        lost = (first.diverged, second.diverged & ~first.diverged)
        for rung, name, new in ((first, "β", lost[0]), (second, "β₂", lost[1])):
            if new.any():
                notes.append(
                    f"{int(new.sum())} of {num_chains} chains diverged at {name} = {rung.beta:.4g}"
                )
        if not ok.all():
            notes.append(f"λ̂ is taken over the {int(ok.sum())} chains that finished both rungs")
        notes += sampler_notes(rungs, gp.sampler)
        for note in gp.warnings:
            warnings.warn(note, UserWarning, stacklevel=2)
        return WBICResult(
            wbic=first.mean,
            wbic_se=float(wbic_se),
            beta=beta,
            expected_nll2=second.mean,
            expected_nll2_se=second.mcse,
            beta2=beta2,
            lambda_hat=float(lam),
            lambda_se=float(lam_se),
            wbic_per_chain=first.chain_means,
            lambda_per_chain=lam_chain,
            ess=first.ess,
            nll_at_center=gp.nll_at_center,
            n=gp.n,
            num_params=gp.num_params,
            prior_std=gp.prior_std,
            prior_mean=gp.prior_mean,
            sampler=gp.sampler,
            step_size=first.step_size,
            step_size2=second.step_size,
            acceptance=first.acceptance,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=num_burnin,
            num_anneal=num_anneal,
            seed=seed,
            seconds=time.perf_counter() - t0,
            warnings=tuple(notes),
        )
