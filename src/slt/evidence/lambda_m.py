"""λ and the multiplicity m from λ̂ measured at several nβ.

Exact sampling of the tempered posterior gives nβ E[K] = λ - (m - 1)/log nβ + o(1/log nβ)
(Watanabe 2009; THEORY.md). One more term is generic: if the partition function behaves as
Z(t) ∝ t^(-λ) (log t)^(m-1) (c_0 + c_1/log t + ...), then t E[K] = -d log Z/d log t =
λ - (m - 1) x + (c_1/c_0) x² + O(x³) with x = 1/log t — a polynomial in x, fitted here by
weighted least squares. For m = 1 the x² coefficient vanishes (only powers of 1/t remain);
for m ≥ 2 it does not, and it matters: for a²b²c² a quadratic fit finds c_1/c_0 ≈ 2.4 to 4,
and leaving it out biases the straight-line fit's m by -0.8 to -1.2 at every practical nβ.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
from scipy import stats

from slt import _checks
from slt.evidence._result import ToDict


@dataclass(frozen=True)
class LambdaMResult(ToDict):
    """λ and m fitted to λ̂(nβ). Arrays are ``(point,)`` over the nβ values used."""

    lam: float  # intercept: λ̂ extrapolated to 1/log nβ = 0
    lam_std: float
    m: float  # 1 - slope in x = 1/log nβ (continuous)
    m_std: float
    m_int: int  # the integer ≥ 1 nearest to m
    m_consistent: tuple[int, ...]  # integers ≥ 1 inside the `confidence` interval of m
    m_interval: tuple[float, float]
    lam_at_m: float  # λ refitted with m fixed at m_int
    lam_at_m_std: float
    curvature: float  # coefficient of 1/log² nβ (0 when order = 1)
    curvature_std: float
    order: int
    confidence: float
    chi2: float  # Σ (residual/σ)², or the residual sum of squares when unweighted
    dof: int
    weighted: bool  # llc_std was given
    inflated: bool  # errors scaled up by √(χ²/dof) > 1
    nbeta: np.ndarray  # (point,)
    llc: np.ndarray  # (point,)
    llc_std: np.ndarray | None  # (point,)
    residuals: np.ndarray  # (point,) llc - fit
    warnings: tuple[str, ...]

    def __str__(self) -> str:
        lo, hi = self.m_interval
        fit = "λ - (m-1)/log nβ" + (" + c/log² nβ" if self.order == 2 else "")
        lines = [
            f"λ = {self.lam:.4g} ± {self.lam_std:.2g}   m = {self.m:.3g} ± {self.m_std:.2g}  "
            f"(fit of λ̂ = {fit} over nβ {self.nbeta.min():.3g}–{self.nbeta.max():.3g}, "
            f"{len(self.nbeta)} points)",
            f"  m as an integer: {self.m_int}; consistent at {self.confidence:.0%}: "
            f"{_integers(self.m_consistent)}   (interval {lo:.3g} to {hi:.3g})",
            f"  with m = {self.m_int}: λ = {self.lam_at_m:.4g} ± {self.lam_at_m_std:.2g}",
        ]
        if self.order == 2:
            lines.append(f"  c = {self.curvature:.3g} ± {self.curvature_std:.2g}")
        stat = "χ²" if self.weighted else "residual sum of squares"
        lines.append(f"  {stat} {self.chi2:.3g} on {self.dof} dof"
                     + ("; errors scaled by √(χ²/dof)" if self.inflated else ""))  # fmt: skip
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _integers(values: tuple[int, ...]) -> str:
    if not values:
        return "none"
    if len(values) > 3 and values[-1] - values[0] == len(values) - 1:
        return f"{{{values[0]}, ..., {values[-1]}}}"
    return "{" + ", ".join(map(str, values)) + "}"


def _wls(design: np.ndarray, y: np.ndarray, weights: np.ndarray):
    """Coefficients, their covariance (for unit-variance weights), and χ²."""
    sw = np.sqrt(weights)
    a, b = design * sw[:, None], y * sw
    coef, *_ = np.linalg.lstsq(a, b, rcond=None)
    cov = np.linalg.inv(a.T @ a)
    return coef, cov, float(np.sum((b - a @ coef) ** 2))


TOO_CLOSE = 0.01
"""A weighted fit whose χ² falls below this quantile of its χ² law is warned of."""


def estimate_lambda_m(
    nbeta,
    llc=None,
    llc_std=None,
    *,
    order: int = 2,
    confidence: float = 0.95,
) -> LambdaMResult:
    """Fit λ̂(nβ) = λ - (m - 1)/log nβ [+ c/log² nβ] and read off λ and m.

    Weighted least squares in x = 1/log nβ with weights 1/σ_i² (``llc_std``), or ordinary
    least squares with σ estimated from the residuals when ``llc_std`` is None (exact
    values, or unknown errors). With weights, if χ²/dof > 1 the standard errors are scaled
    by √(χ²/dof) (the fit does not describe the points to their stated errors) and a
    warning says so. The integers m ≥ 1 consistent at ``confidence`` are those inside the
    interval m̂ ± q·se (q normal, or Student t with N - p dof when σ is estimated) — the
    same set a likelihood-ratio test of m fixed against m free accepts in this linear
    Gaussian model. ``lam_at_m`` refits λ with m fixed at the nearest integer.

    How large nβ must be (exact finite-nβ expectations nβ E[K] under exp(-nβK - ‖w‖²/2),
    :func:`slt.zoo.expected_llc`, 7 points from nβ_min to 1000 nβ_min):

    ======  =========  ====================  =====================
    order   nβ_min     a², a²b²  (m = 1, 2)  a²b²c² (m = 3)
    ======  =========  ====================  =====================
    2       10         m̂ 0.95, 1.75          m̂ 2.09, λ̂ -12%
    2       100        m̂ 0.96, 1.88          m̂ 2.58, λ̂ -4.1%
    2       1000       m̂ 0.99, 1.91          m̂ 2.80, λ̂ -1.6%
    1       100        m̂ 1.02, 1.56          m̂ 1.79, λ̂ -15%
    1       1000       m̂ 1.00, 1.65          m̂ 2.04, λ̂ -9.4%
    1       10000      m̂ 1.00, 1.71          m̂ 2.21, λ̂ -6.3%
    ======  =========  ====================  =====================

    So with ``order=2`` the nearest integer is right for m ≤ 2 from nβ ≈ 10 and for m = 3
    from nβ ≈ 1000, λ within 5% from nβ ≈ 100; the straight line (``order=1``, the
    leading form of THEORY.md) gets m = 3 wrong at any practical nβ. The price of the
    extra term is precision: over nβ = 10²–10⁴ (6 points) se(m) is 11σ for order 1 and
    110σ for order 2, σ the error of each λ̂, so to pin m within ± 0.5 at 95% order 2
    needs σ ≲ 0.002 there (0.4% of λ = 1/2).

    Parameters
    ----------
    nbeta : array (point,) or :class:`slt.nbeta.NbetaSweep`
        nβ > 1 of each point, at least ``order + 1`` distinct values; a sweep supplies
        ``llc`` and ``llc_std`` as well.
    llc, llc_std : array (point,)
        λ̂ at each nβ and its standard error (None: unweighted).
    order : {1, 2}
        Highest power of 1/log nβ in the fit.
    confidence : float
        Level of the interval for m.

    Examples
    --------
    >>> import numpy as np
    >>> nb = np.geomspace(1e2, 1e6, 9)
    >>> res = estimate_lambda_m(nb, 1.5 - 2 / np.log(nb), order=1)   # exact, λ = 1.5, m = 3
    >>> round(res.lam, 6), round(res.m, 6), res.m_int
    (1.5, 3.0, 3)
    """
    carried: tuple[str, ...] = ()
    if llc is None and hasattr(nbeta, "llc"):  # a sweep: its points' warnings come along
        carried = tuple(f"sweep: {w}" for w in getattr(nbeta, "warnings", ()))
        nbeta, llc, llc_std = nbeta.nbeta, nbeta.llc, nbeta.llc_std
    if llc is None:
        raise ValueError("estimate_lambda_m: pass llc (λ̂ at each nβ), or an NbetaSweep")
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    order = int(order)
    confidence = _checks.real("confidence", confidence, minimum=0, strict=True, maximum=1,
                              strict_max=True)  # fmt: skip
    nb, y = np.asarray(nbeta, dtype=float).ravel(), np.asarray(llc, dtype=float).ravel()
    se = None if llc_std is None else np.asarray(llc_std, dtype=float).ravel()
    if nb.shape != y.shape or (se is not None and se.shape != y.shape):
        raise ValueError(f"nbeta, llc, llc_std must have one value per point, got shapes "
                         f"{nb.shape}, {y.shape}, {None if se is None else se.shape}")  # fmt: skip
    if np.any(~np.isfinite(nb)) or np.any(nb <= 1):
        raise ValueError(f"nbeta must be finite and > 1 (x = 1/log nβ), got {nb.tolist()}")
    warnings = list(carried)
    keep = np.isfinite(y) & (np.isfinite(se) if se is not None else True)
    if not keep.all():
        warnings.append(f"{int((~keep).sum())} points with non-finite λ̂ or error left out")
        nb, y, se = nb[keep], y[keep], (se[keep] if se is not None else None)
    if se is not None and np.any(se <= 0):
        raise ValueError(f"llc_std must be > 0 (or None for an unweighted fit), got {se.tolist()}")
    p = order + 1
    if len(y) < p + (se is None):
        dropped = "" if keep.all() else (
            f" ({int((~keep).sum())} left out for a non-finite λ̂ or llc_std; one-chain "
            "estimates have no llc_std: pass llc_std=None for an unweighted fit, or run more "
            "chains)"
        )  # fmt: skip
        raise ValueError(f"need at least {p + (se is None)} points for order={order}"
                         f"{' without llc_std' if se is None else ''}, got {len(y)}"
                         f"{dropped}")  # fmt: skip
    distinct = np.unique(nb)
    if len(distinct) < p:
        raise ValueError(
            f"nbeta needs at least {p} distinct values for order={order} (a fit of {p} "
            f"coefficients), got {len(distinct)}: {distinct.tolist()}"
            + (" (after leaving out points with non-finite λ̂)" if not keep.all() else "")
        )
    x = 1 / np.log(nb)
    design = np.stack([np.ones_like(x), -x, x * x][:p], 1)
    weights = np.ones_like(y) if se is None else 1 / se**2
    coef, cov, chi2 = _wls(design, y, weights)
    dof = len(y) - p
    inflated = False
    if se is None:
        scale = chi2 / dof
        q = stats.t.ppf(0.5 + confidence / 2, dof)
    else:
        scale, q = 1.0, stats.norm.ppf(0.5 + confidence / 2)
        if dof > 0 and chi2 / dof > 1:
            scale, inflated = chi2 / dof, True
            warnings.append(f"χ²/dof = {chi2 / dof:.3g} > 1: the points scatter about the fit "
                            "more than their errors say; standard errors scaled up")  # fmt: skip
        elif dof > 0 and (low := stats.chi2.cdf(chi2, dof)) < TOO_CLOSE:
            warnings.append(
                f"χ² = {chi2:.3g} on {dof} dof: the points lie closer to the fit than their "
                f"errors allow (P = {low:.2g}), as correlated points do "
                "(llc_vs_nbeta runs every nβ from one seed); the errors of λ and m assume "
                "independent points and may be too small"
            )
    cov = cov * scale
    m, m_std = 1 + coef[1], math.sqrt(cov[1, 1])
    lo, hi = m - q * m_std, m + q * m_std
    first, last = max(1, math.ceil(lo)), min(math.floor(hi), max(1, math.ceil(lo)) + 99)
    consistent = tuple(range(first, last + 1))
    m_int = max(1, round(m))
    if not consistent:
        warnings.append(f"no integer m ≥ 1 in the {confidence:.0%} interval [{lo:.3g}, {hi:.3g}]"
                        f"; {m_int} is the nearest")  # fmt: skip
    fixed = np.delete(design, 1, axis=1)
    coef_m, cov_m, _ = _wls(fixed, y + (m_int - 1) * x, weights)
    cov_m = cov_m * scale
    return LambdaMResult(
        lam=float(coef[0]),
        lam_std=math.sqrt(cov[0, 0]),
        m=float(m),
        m_std=m_std,
        m_int=m_int,
        m_consistent=consistent,
        m_interval=(float(lo), float(hi)),
        lam_at_m=float(coef_m[0]),
        lam_at_m_std=math.sqrt(cov_m[0, 0]),
        curvature=float(coef[2]) if order == 2 else 0.0,
        curvature_std=math.sqrt(cov[2, 2]) if order == 2 else 0.0,
        order=order,
        confidence=confidence,
        chi2=chi2,
        dof=dof,
        weighted=se is not None,
        inflated=inflated,
        nbeta=nb,
        llc=y,
        llc_std=se,
        residuals=y - design @ coef,
        warnings=tuple(warnings),
    )
