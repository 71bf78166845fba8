"""BIC and the Laplace approximation: the free energies that assume a regular model.

- BIC (Schwarz 1978, Ann. Statist. 6(2)): F_n ≈ n L_n(ŵ) + (d/2) log n.
- Laplace (e.g. MacKay 2003, ch. 27; Tierney & Kadane 1986, JASA 81): with φ = N(μ, σ² I),
  F_n ≈ n L_n(ŵ) - log φ(ŵ) + (d/2) log(n/2π) + ½ log det H, H = ∇²L_n(ŵ) + I/(nσ²).

Both replace the learning coefficient λ by d/2. At a singular ŵ the Hessian has (near-)zero
eigenvalues and the Laplace answer is decided by them and the prior, not by the data: each
flat direction adds ½ log(n/2π) + ½ log(1/(nσ²)) = -½ log(2πσ²), independent of n, so the
Laplace free energy grows like (rank/2) log n. :func:`laplace` reports those eigenvalues
instead of hiding them behind an ε. The Hessian rank r brackets λ: r/2 ≤ λ ≤ r/2 + (d - r)/4
(THEORY.md; the upper bound argued by Bushnaq 2024).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from slt import _checks, _globals
from slt.evidence._result import ToDict
from slt.evidence.functional import FlatLoss, log_normal
from slt.evidence.spectrum import hessian_spectrum, zero_threshold
from slt.losses import LossFn


@dataclass(frozen=True)
class BICResult(ToDict):
    """BIC = n L_n(ŵ) + (d/2) log n at the model's parameters ŵ."""

    bic: float
    nll: float  # n L_n(ŵ)
    penalty: float  # (d/2) log n
    loss: float  # L_n(ŵ)
    grad_norm: float  # ‖∇L_n(ŵ)‖: BIC assumes ŵ minimizes L_n
    num_params: int
    n: int
    # n L_n's fall along -∇L_n to the minimum of its quadratic model there, ½ n ‖g‖⁴/gᵀHg
    # (inf where the curvature along g is not positive): > 0.5 nats, ŵ is not a minimum
    descent: float = 0.0
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [
            f"BIC = {self.bic:.8g}  (n L_n(ŵ) {self.nll:.8g} + (d/2) log n {self.penalty:.6g}; "
            f"d {self.num_params}, n {self.n})",
            f"  ‖∇L_n(ŵ)‖ = {self.grad_norm:.2g} (ŵ should minimize L_n)",
        ]
        return "\n".join(lines + [f"  warning: {w}" for w in self.warnings])


@dataclass(frozen=True)
class LaplaceResult(ToDict):
    """The Laplace free energy with the Hessian's near-zero eigenvalues reported."""

    free_energy: float  # n L_n(ŵ) - log φ(ŵ) + (d/2) log(n/2π) + ½ log det H
    free_energy_upper: float  # = free_energy when the spectrum is complete (see `method`)
    nll: float  # n L_n(ŵ)
    log_prior: float  # log φ(ŵ)
    log_det: float  # log det H, H = ∇²L_n(ŵ) + I/(nσ²) (unknown eigenvalues taken as 0)
    eigenvalues: np.ndarray  # (k,) of ∇²L_n(ŵ), ascending; k = d unless method is "eigsh"
    prior_precision: float  # 1/(nσ²), added to every eigenvalue
    threshold: float  # |λ| ≤ threshold counts as zero
    num_small: int  # computed eigenvalues with |λ| ≤ threshold
    num_negative: int  # eigenvalues < -threshold: ŵ is not a minimum
    num_prior_dominated: int  # eigenvalues (of those computed) below 1/(nσ²)
    num_unknown: int  # eigenvalues not computed (d - k)
    rank: int  # eigenvalues > threshold (a lower bound when num_unknown > 0)
    small_log_det: float  # Σ over the small ones of log(λ_i + 1/(nσ²))
    rest_log_det: float  # the same over the others computed
    lambda_bracket: tuple[float, float]  # r/2 ≤ λ ≤ r/2 + (d - r)/4
    newton_decrement: float  # ½ gᵀ(nH)⁻¹g, g = ∇(n L_n - log φ)(ŵ): F's shift to the mode
    bic: float
    num_params: int
    n: int
    prior_std: float
    method: str  # "dense" (all eigenvalues) or "eigsh" (the top k; see `approximation`)
    approximation: str
    warnings: tuple[str, ...]

    @property
    def small_contribution(self) -> float:
        """½ Σ_small log(λ_i + 1/(nσ²)): what the near-zero eigenvalues add to F."""
        return 0.5 * self.small_log_det

    def __str__(self) -> str:
        d, p = self.num_params, self.prior_precision
        # a range only where the eigenvalues left out leave one (NaN never equals NaN)
        same = self.free_energy == self.free_energy_upper or (
            math.isnan(self.free_energy) and math.isnan(self.free_energy_upper)
        )
        span = (f"{self.free_energy:.8g}" if same
                else f"in [{self.free_energy:.8g}, {self.free_energy_upper:.8g}]")  # fmt: skip
        lo, hi = self.lambda_bracket
        lines = [
            f"Laplace free energy F ≈ {span}  (d {d}, n {self.n}, prior σ {self.prior_std:g}, "
            f"{self.method} Hessian)",
            f"  n L_n(ŵ) {self.nll:.8g}   -log φ(ŵ) {-self.log_prior:.6g}   "
            f"(d/2) log(n/2π) {d / 2 * math.log(self.n / (2 * math.pi)):.6g}   "
            f"½ log det H {0.5 * self.log_det:.6g}   (BIC {self.bic:.8g})",
            f"  Hessian of L_n: rank {self.rank} of {d}; {self.num_small} eigenvalues with "
            f"|λ| ≤ {self.threshold:.2g} ({self.num_negative} below -{self.threshold:.2g}); "
            f"{self.num_prior_dominated} below 1/(nσ²) = {p:.2g}",
            f"  the near-zero ones add ½ Σ log(λ_i + 1/(nσ²)) = {self.small_contribution:.6g} "
            f"to F, the other {len(self.eigenvalues) - self.num_small} computed add "
            f"{0.5 * self.rest_log_det:.6g}",
            f"  rank bracket for the learning coefficient: {lo:g} ≤ λ ≤ {hi:g}  "
            f"(r/2 ≤ λ ≤ r/2 + (d - r)/4)   Newton decrement {self.newton_decrement:.2g}",
        ]
        if self.num_unknown:
            lines.append(f"  {self.approximation}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _setup(model, loader, loss_fn, n, dtype):
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float64) or None, got {dtype!r}")
    flat = FlatLoss(model, loader, loss_fn, dtype=dtype)
    n = _checks.integer("n", n if n is not None else flat.n, minimum=1)
    w = flat.center
    with torch.no_grad():
        loss = float(flat._sum(lambda b: flat.batch_loss(w, b)))
    if not math.isfinite(loss):
        raise ValueError(f"the loss at the model's parameters is {loss}; check model and loss_fn")
    return flat, n, w, loss, flat.grad(w)


def bic(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> BICResult:
    """BIC = n L_n(ŵ) + (d/2) log n at the model's current parameters ŵ (Schwarz 1978).

    ŵ should be a minimizer of L_n (the maximum-likelihood fit); the result reports
    ‖∇L_n(ŵ)‖ to check. d counts the trainable parameters. BIC is the regular model's
    asymptotic free energy; for a singular model F_n = n L_n(w0) + λ log n -
    (m - 1) log log n + O_p(1) with λ ≤ d/2 (Watanabe 2009).

    Parameters
    ----------
    model : torch.nn.Module at ŵ (copied, never modified)
    loader : re-iterable of batches (a ``DataLoader``, a list); read once in full
    loss_fn : callable ``(model, batch) -> Tensor``, the batch mean per-sample NLL
    n : int, optional
        Sample size; default the number of samples the loader yields.
    dtype : torch.dtype or None
        Precision of the computation (float64 by default; None keeps the model's).

    Examples
    --------
    >>> import math, torch, slt
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = torch.nn.init.zeros_(model.weight)
    >>> data = [(torch.tensor([[1.0], [-1.0]]), torch.zeros(2, 1))]
    >>> res = bic(model, data, slt.gaussian_nll(1.0))
    >>> round(res.bic - (2 * 0.5 * math.log(2 * math.pi) + 0.5 * math.log(2)), 12)
    0.0
    """
    with _globals.private(0):  # what the model draws (an always-on dropout) is not the caller's
        flat, n, w, loss, g = _setup(model, loader, loss_fn, n, dtype)
        square = float(g @ g)
        curvature = float(g @ flat.hvp(w, g)) if square > 0 else 0.0
    penalty = 0.5 * flat.dim * math.log(n)
    if square == 0:
        descent = 0.0
    else:
        descent = 0.5 * n * square**2 / curvature if curvature > 0 else math.inf
    notes = []
    if descent > BIC_DESCENT:
        notes.append(
            f"ŵ is not a minimum of L_n: along -∇L_n, n L_n falls by about {descent:.3g} "
            "nats (to the minimum of its quadratic model on that line; inf: the curvature "
            "there is not positive), and BIC with it; fit ŵ to the minimum first"
        )
    return BICResult(
        bic=n * loss + penalty,
        nll=n * loss,
        penalty=penalty,
        loss=loss,
        grad_norm=float(g.norm()),
        num_params=flat.dim,
        n=n,
        descent=descent,
        warnings=tuple(notes),
    )


BIC_DESCENT = 0.5
"""Nats of n L_n that a step along -∇L_n would gain, above which bic warns."""


def laplace(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    n: int | None = None,
    prior_std: float = 1.0,
    prior_mean: float = 0.0,
    threshold: float | None = None,
    dense_max: int = 2000,
    num_eigs: int = 200,
    dtype: torch.dtype | None = torch.float64,
    seed: int = 0,
) -> LaplaceResult:
    """The Laplace approximation of F_n at the model's parameters ŵ, eigenvalue by eigenvalue.

    F_n ≈ n L_n(ŵ) - log φ(ŵ) + (d/2) log(n/2π) + ½ Σ_i log(λ_i + 1/(nσ²)), with λ_i the
    eigenvalues of ∇²L_n(ŵ) and φ = N(μ, σ² I): the Gaussian integral of the second-order
    expansion of n L_n - log φ at its minimum (Tierney & Kadane 1986). Exact for a
    Gaussian-linear model at its MAP; at a singular ŵ the near-zero eigenvalues (reported,
    never padded with an ε) and the prior decide ½ log det H.

    Parameters
    ----------
    model, loader, loss_fn, n, dtype : as for :func:`bic`. ŵ should minimize
        n L_n - log φ; ``newton_decrement`` = ½ gᵀ(nH)⁻¹g says how far F would move to the
        exact minimum (second order), and a warning is given above 0.01.
    prior_std, prior_mean : float
        σ and μ of the prior N(μ, σ² I).
    threshold : float, optional
        Eigenvalues with |λ| ≤ threshold count as zero for ``rank`` and ``num_small``.
        Default 1e-6 × max(|λ|_max, 1) (:func:`slt.evidence.spectrum.zero_threshold`).
    dense_max, num_eigs : int
        Up to d = ``dense_max`` (≥ 0), or when ``num_eigs`` (≥ 1) ≥ d, the whole Hessian is
        formed and diagonalized. Otherwise the ``num_eigs`` largest eigenvalues come from
        Lanczos (``eigsh``) on Hessian-vector products; the other d - k are unknown,
        taken as 0 in ``free_energy`` and as the smallest computed one in
        ``free_energy_upper`` (for a positive semi-definite H these bound F), ``rank``
        becomes a lower bound unless the computed spectrum reaches the threshold, and
        negative eigenvalues go undetected.
    seed : int
        Seed of Lanczos' starting vector (the eigsh path only).

    Examples
    --------
    >>> import torch, slt
    >>> model = torch.nn.Linear(2, 1, bias=False)   # y = w·x, x = (1, 0): w_2 is unused
    >>> _ = torch.nn.init.zeros_(model.weight)
    >>> data = [(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.zeros(2, 1))]
    >>> res = laplace(model, data, slt.gaussian_nll(1.0))
    >>> res.rank, res.num_small, res.lambda_bracket
    (1, 1, (0.5, 0.75))
    """
    std = _checks.real("prior_std", prior_std, minimum=0, strict=True)
    mean = _checks.real("prior_mean", prior_mean)
    if threshold is not None:
        threshold = _checks.real("threshold", threshold, minimum=0)
    dense_max = _checks.integer("dense_max", dense_max, minimum=0)
    num_eigs = _checks.integer("num_eigs", num_eigs, minimum=1)
    seed = _checks.seed(seed)
    with _globals.private(seed):  # what the model draws is not the caller's
        flat, n, w, loss, g = _setup(model, loader, loss_fn, n, dtype)
        try:
            spec, h = hessian_spectrum(flat, w, dense_max=dense_max, num_eigs=num_eigs,
                                       seed=seed)  # fmt: skip
        except RuntimeError as err:
            if "randomness" not in str(err):
                raise
            raise ValueError(
                "laplace: the model draws random numbers in its forward pass (an always-on "
                "dropout, say), so its Hessian at ŵ is not defined; evaluate it without them"
            ) from err
    d, p = flat.dim, 1.0 / (n * std * std)
    ev = spec.eigenvalues
    thr = zero_threshold(ev) if threshold is None else threshold
    small = np.abs(ev) <= thr
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.where(ev + p > 0, np.log(ev + p), np.nan)
    unknown = d - len(ev)
    floor = float(ev.min()) if unknown else 0.0
    log_det = float(logs.sum()) + unknown * math.log(p)
    log_det_upper = float(logs.sum()) + unknown * math.log(max(floor, 0.0) + p)
    log_prior = log_normal(w.double(), mean, std)
    base = n * loss - log_prior + 0.5 * d * math.log(n / (2 * math.pi))
    rank = int((ev > thr).sum())
    warnings = []
    num_negative = int((ev < -thr).sum())
    if num_negative:
        warnings.append(f"{num_negative} eigenvalues below -{thr:.2g}: ŵ is not a minimum of L_n")
    if np.isnan(logs).any():
        warnings.append("λ_i + 1/(nσ²) ≤ 0 for some i: the Laplace approximation is undefined")
    decrement = math.nan
    if h is not None and not np.isnan(logs).any():
        grad_full = (n * g + (w - mean) / std**2).double()
        h_full = n * (h.double() + p * torch.eye(d, dtype=torch.float64, device=h.device))
        decrement = float(0.5 * grad_full @ torch.linalg.solve(h_full, grad_full))
        if decrement > 0.01:
            warnings.append(f"ŵ is not the minimum of n L_n - log φ: Newton decrement "
                            f"{decrement:.2g} (F would move by about that much)")  # fmt: skip
    approximation = ""
    if unknown:
        approximation = (
            f"approximation: {len(ev)} of {d} eigenvalues computed (eigsh on Hessian-vector "
            f"products); the other {unknown} are taken as 0 in F, adding "
            f"{0.5 * unknown * math.log(p):.6g} (as {floor:.3g}, the smallest computed, in the "
            "upper value)"
            + ("" if floor <= thr else f"; rank ≥ {rank}, so {rank / 2:g} ≤ λ ≤ {d / 2:g}")
        )
    bracket = (rank / 2, d / 2 if unknown and floor > thr else rank / 2 + (d - rank) / 4)
    return LaplaceResult(
        free_energy=base + 0.5 * log_det,
        free_energy_upper=base + 0.5 * log_det_upper,
        nll=n * loss,
        log_prior=log_prior,
        log_det=log_det,
        eigenvalues=ev,
        prior_precision=p,
        threshold=thr,
        num_small=int(small.sum()),
        num_negative=num_negative,
        num_prior_dominated=int((ev < p).sum()),
        num_unknown=unknown,
        rank=rank,
        small_log_det=float(logs[small].sum()),
        rest_log_det=float(logs[~small].sum()),
        lambda_bracket=bracket,
        newton_decrement=decrement,
        bic=n * loss + 0.5 * d * math.log(n),
        num_params=d,
        n=n,
        prior_std=std,
        method=spec.method,
        approximation=approximation,
        warnings=tuple(warnings),
    )
