"""Choose the SGLD step size ε from short pilot chains, by measurable criteria.

The stiffest posterior direction has precision P_max ≈ nβ q_max + γ, with q_max the top
eigenvalue of the Hessian of L_n at w* (power iteration on Hessian-vector products).
Full-batch SGLD on a Gaussian direction of precision P has stationary variance
1/(P(1 - εP/4)) (exact; see tests/test_llc_statistics.py), so the grid starts where
that inflation is ``max_stiff_bias`` in the stiffest direction, ε₀ = 4·max_stiff_bias/P_max,
and halves. From the largest ε down, each candidate runs a short pilot and must pass:

1. no diverged chain;
2. a stationary post-burn-in λ̂ trace (first and last thirds agree within their error);
3. MALA acceptance of the SGLD moves ≥ ``min_acceptance`` (Furman & Lau 2024,
   arXiv 2402.03698): a move MALA would often reject is a move SGLD makes with bias;
4. minibatch gradient noise small against the injected noise: the ratio
   ε nβ² Var[∇L_B]/4 (per coordinate, measured from minibatch gradients at w*; THEORY.md)
   ≤ ``max_noise_ratio`` — checked only without the gradient control variate, which
   removes most of that noise near w*;
5. λ̂ flat as ε shrinks: λ̂(ε) and λ̂(ε/2) agree within ``flat_tolerance`` (relative)
   plus two standard errors.

The chosen ε is the largest candidate that passes 1-4 and whose next-smaller neighbour
also passes 1-4 and agrees with it (5). The pilot uses the same nβ, γ, sampler and
control variate as the estimate it serves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from slt.losses import LossFn
from slt.posterior import Posterior


@dataclass(frozen=True)
class Candidate:
    """One step size tried by the calibration."""

    step_size: float
    llc: float
    llc_std: float
    diverged: bool
    acceptance: float  # mean MALA acceptance of the pilot's SGLD moves (NaN if unmeasured)
    noise_ratio: float  # ε nβ² Var[∇L_B] / 4 at w*
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

    def to_dict(self) -> dict:
        out = asdict(self)
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    def __str__(self) -> str:
        head = (
            f"{'step_size':>10} {'λ̂ ± se':>18} {'accept':>7} {'noise':>7} {'stat.':>5} "
            f"{'flat':>5} {'ok':>3}  reasons"
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
                f"{c.noise_ratio:>7.3f} {'yes' if c.stationary else 'no':>5} {flat:>5} "
                f"{'yes' if c.passed else 'no':>3}  {'; '.join(c.reasons)}{mark}"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self):
        """λ̂ (± 2 se) and MALA acceptance against ε; returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        eps = np.array([c.step_size for c in self.candidates])
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 5), sharex=True)
        llc = [c.llc for c in self.candidates]
        top.errorbar(eps, llc, yerr=[2 * c.llc_std for c in self.candidates], fmt="o-", capsize=3)
        top.axvline(self.step_size, color="tab:green", ls="--", label="chosen")
        top.set(ylabel="λ̂ (± 2 se)", xscale="log", title="step-size calibration")
        top.legend(fontsize=8)
        bottom.plot(eps, [c.acceptance for c in self.candidates], "o-")
        bottom.axvline(self.step_size, color="tab:green", ls="--")
        bottom.set(xlabel="step size ε", ylabel="MALA acceptance", xscale="log", ylim=(0, 1.05))
        fig.tight_layout()
        return fig


def top_hessian_eigenvalue(posterior: Posterior, batch, *, iters: int = 20, seed: int = 0) -> float:
    """Largest |eigenvalue| of the Hessian of L_B at w*, by power iteration on HVPs."""
    params = list(posterior.reset().values())
    g = torch.Generator(device=posterior.device).manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for p in params]
    eig = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        loss = posterior.loss_fn(posterior.module, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]
        eig = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = hv
        if not any(x.abs().sum() > 0 for x in v):
            return 0.0
    return abs(eig)


def minibatch_gradient_variance(
    posterior: Posterior, *, num_batches: int = 16, seed: int = 0
) -> float:
    """Mean over coordinates of Var[∇L_B(w*)] across ``num_batches`` minibatches."""
    params = list(posterior.reset().values())
    stream = posterior.batches.forever(torch.Generator().manual_seed(seed))
    flats = []
    for _ in range(num_batches):
        loss = posterior.loss_fn(posterior.module, next(stream))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flats.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)
        ]).double())  # fmt: skip
    stacked = torch.stack(flats)
    return float(stacked.var(dim=0, unbiased=True).mean())


def _stationary(llc_trace: np.ndarray, diverged: np.ndarray, z: float = 4.0) -> bool:
    """First and last thirds of the pooled per-draw λ̂ agree within ``z`` batch-means SEs."""
    x = llc_trace[~diverged]
    if x.size == 0 or x.shape[1] < 30:
        return True
    third = x.shape[1] // 3
    first, last = x[:, :third], x[:, -third:]

    def mean_se(a):
        batches = (
            a.reshape(a.shape[0], 5, -1).mean(axis=2).ravel() if a.shape[1] >= 5 else a.ravel()
        )
        return batches.mean(), batches.std(ddof=1) / math.sqrt(batches.size)

    m1, s1 = mean_se(first[:, : third - third % 5])
    m2, s2 = mean_se(last[:, : third - third % 5])
    return abs(m1 - m2) <= z * math.hypot(s1, s2) + 1e-12


def calibrate(
    model,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    step_sizes: Sequence[float] | None = None,
    nbeta: float | None = None,
    localization: float = 1.0,
    sampler: str = "sgld",
    control_variate: str = "gradient",
    num_chains: int = 2,
    num_draws: int = 200,
    num_burnin: int = 100,
    max_stiff_bias: float = 0.05,
    min_acceptance: float = 0.9,
    max_noise_ratio: float = 0.1,
    flat_tolerance: float = 0.05,
    num_candidates: int = 6,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationResult:
    """Pick the largest step size that passes the criteria of this module's docstring.

    ``step_sizes`` (descending after sorting) overrides the grid
    4·max_stiff_bias/P_max · 2^-k, k < ``num_candidates``. Pilot chains use
    ``num_chains × (num_burnin + num_draws)`` steps per candidate; the search stops at the
    first candidate confirmed by its neighbour.

    Examples
    --------
    >>> import slt
    >>> case = slt.zoo.regular(4, n=512)
    >>> cal = slt.calibrate(case.model, case.loader(), case.loss_fn, progress=False)
    >>> 0 < cal.step_size <= 0.2 / (cal.nbeta * cal.top_hessian_eigenvalue)
    True
    """
    from slt.llc import estimate_llc

    start = time.perf_counter()
    posterior = Posterior(model, loader, loss_fn, nbeta=nbeta, localization=localization,
                          control_variate="none")  # fmt: skip
    probe = next(posterior.batches.forever(torch.Generator().manual_seed(seed)))
    q_max = top_hessian_eigenvalue(posterior, probe, seed=seed)
    grad_var = minibatch_gradient_variance(posterior, seed=seed)
    p_max = posterior.nbeta * q_max + posterior.localization
    if step_sizes is None:
        if p_max <= 0:
            raise ValueError(
                "calibrate: the loss is flat at w* and localization is 0; pass step_sizes"
            )
        scale = 0.1 if sampler == "rmsprop_sgld" else 1.0  # its preconditioner reaches 1/δ = 10
        top = scale * 4 * max_stiff_bias / p_max
        grid = [top * 2.0**-k for k in range(num_candidates)]
    else:
        grid = sorted((float(e) for e in step_sizes), reverse=True)
        if not grid or any(not (math.isfinite(e) and e > 0) for e in grid):
            raise ValueError(f"step_sizes must be finite numbers > 0, got {step_sizes!r}")
    pilot = dict(nbeta=nbeta, localization=localization, sampler=sampler,
                 control_variate=control_variate, num_chains=num_chains, num_draws=num_draws,
                 num_burnin=num_burnin, seed=seed, progress=False)  # fmt: skip
    check_noise = control_variate != "gradient"

    def trial(eps: float) -> tuple[Candidate, object]:
        reasons = []
        try:
            res = estimate_llc(model, loader, loss_fn, step_size=eps, **pilot)
        except Exception as err:  # every chain diverged
            if type(err).__name__ != "DivergenceError":
                raise
            cand = Candidate(eps, math.nan, math.nan, True, math.nan,
                             eps * posterior.nbeta**2 * grad_var / 4, False, None, False,
                             ("all chains diverged",))  # fmt: skip
            return cand, None
        acceptance = float(getattr(res, "mala_acceptance", math.nan))
        noise = eps * posterior.nbeta**2 * grad_var / 4
        stationary = _stationary(res.llc_trace, res.diverged)
        if res.diverged.any():
            reasons.append("divergence")
        if not stationary:
            reasons.append("non-stationary")
        if math.isfinite(acceptance) and acceptance < min_acceptance:
            reasons.append(f"acceptance {acceptance:.2f} < {min_acceptance:g}")
        if check_noise and noise > max_noise_ratio:
            reasons.append(f"gradient noise ratio {noise:.2f} > {max_noise_ratio:g}")
        cand = Candidate(eps, res.llc, res.llc_std, bool(res.diverged.any()), acceptance, noise,
                         stationary, None, not reasons, tuple(reasons))  # fmt: skip
        return cand, res

    tried: list[Candidate] = []
    chosen = None
    for eps in grid:
        cand, _ = trial(eps)
        if tried and tried[-1].passed and cand.passed:
            prev = tried[-1]
            tol = flat_tolerance * abs(cand.llc) + 2 * math.hypot(prev.llc_std, cand.llc_std)
            flat = abs(prev.llc - cand.llc) <= tol
            tried[-1] = _replace(prev, flat=flat, reasons=prev.reasons + (() if flat else (
                f"λ̂ changes by {abs(prev.llc / cand.llc - 1):.0%} at ε/2",)))  # fmt: skip
            if flat:
                chosen = prev.step_size
                tried.append(cand)
                break
        tried.append(cand)
    notes = []
    if chosen is None:
        passing = [c for c in tried if c.passed]
        chosen = passing[-1].step_size if passing else tried[-1].step_size
        notes.append(
            "no step size passed every criterion with a confirming neighbour; using "
            f"{chosen:.3g} — treat the estimate with care (more pilot draws, a smaller grid, "
            "or a larger localization may help)"
        )
    return CalibrationResult(
        step_size=chosen,
        candidates=tuple(tried),
        top_hessian_eigenvalue=q_max,
        gradient_variance=grad_var,
        nbeta=posterior.nbeta,
        localization=posterior.localization,
        settings={k: v for k, v in pilot.items() if k != "progress"}
        | {
            "min_acceptance": min_acceptance,
            "max_noise_ratio": max_noise_ratio,
            "flat_tolerance": flat_tolerance,
        },  # fmt: skip
        warnings=tuple(notes),
        seconds=time.perf_counter() - start,
    )


def _replace(c: Candidate, **changes) -> Candidate:
    from dataclasses import replace

    return replace(c, **changes)
