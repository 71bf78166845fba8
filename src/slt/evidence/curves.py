"""The free energy over a range of n, by every method, with the slopes in log n.

F_n - n L_n(w0) = λ log n - (m - 1) log log n + O_p(1) (Watanabe 2009, main formula II),
while BIC charges (d/2) log n and the Laplace approximation at a singular point (rank r
Hessian) charges (r/2) log n. :func:`evidence_curves` computes, at each n, F_n by
thermodynamic integration (:func:`slt.free_energy`), WBIC (:func:`slt.wbic`), BIC and
Laplace (:func:`slt.bic`, :func:`slt.laplace`) and, for the zoo's potentials, F_n exactly
(quadrature of the closed-form L_n); then the least-squares slope of F_n - n L_n(w*)
against log n for each. On a singular model the slopes of F_n and WBIC sit near λ and
BIC's at d/2: the picture of "BIC is wrong" with numbers on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from slt import _checks
from slt._text import right
from slt.evidence._result import ToDict
from slt.evidence.baselines import bic, laplace
from slt.evidence.quadrature import quadrature_free_energy
from slt.evidence.thermodynamic import free_energy
from slt.evidence.wbic import wbic

DEFAULT_NS = (100, 300, 1000, 3000, 10000)
DEFAULT_POTENTIAL = (1, 2)  # a²b⁴: λ = 1/4, m = 1, d/2 = 1
METHODS = ("exact", "thermodynamic", "wbic", "bic", "laplace")


@dataclass(frozen=True)
class EvidenceCurves(ToDict):
    """Free energies at each n. Arrays are ``(n,)``; every F is reported as F - n L_n(w*)."""

    name: str
    ns: np.ndarray  # (n,)
    nll_at_center: np.ndarray  # (n,) n L_n(w*)
    exact: np.ndarray  # (n,) F_n by quadrature, NaN where not available
    thermodynamic: np.ndarray  # (n,) F_n by thermodynamic integration
    thermodynamic_error: np.ndarray  # (n,) its total stated error (Monte Carlo and integration)
    wbic: np.ndarray  # (n,)
    wbic_se: np.ndarray  # (n,)
    lambda_wbic: np.ndarray  # (n,) λ̂ from two temperatures
    lambda_wbic_se: np.ndarray  # (n,)
    bic: np.ndarray  # (n,)
    laplace: np.ndarray  # (n,)
    slopes: dict  # method -> (slope, se) of F - n L_n(w*) against log n
    num_params: int
    lam: float | None  # the known λ, if any
    m: int | None
    prior_std: float
    seconds: float
    settings: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # the runs' own, "n = …, method: …"

    def __str__(self) -> str:
        d = self.num_params
        known = "" if self.lam is None else f"   λ = {self.lam:g}, m = {self.m}"
        head = (
            f"{'n':>7} {'exact':>9} {'TI':>16} {'WBIC':>16} {'BIC':>9} {'Laplace':>9}"
            f"  {right('λ̂ (WBIC, 2 temps)', 18)}"
        )
        lines = [
            f"Free energy F_n - n L_n(w*) over n: {self.name}   d = {d} (BIC's d/2 = {d / 2:g})"
            f"{known}   prior N(0, {self.prior_std:g}²)",
            head,
            "-" * len(head),
        ]
        for i, n in enumerate(self.ns):
            lines.append(
                f"{n:>7d} {_num(self.exact[i]):>9} "
                f"{_pm(self.thermodynamic[i], self.thermodynamic_error[i]):>16} "
                f"{_pm(self.wbic[i], self.wbic_se[i]):>16} {_num(self.bic[i]):>9} "
                f"{_num(self.laplace[i]):>9}  "
                f"{_pm(self.lambda_wbic[i], self.lambda_wbic_se[i]):>18}"
            )
        slope = "slope in log n:"
        parts = []
        for method, label in (("exact", "exact"), ("thermodynamic", "TI"), ("wbic", "WBIC"),
                              ("bic", "BIC"), ("laplace", "Laplace")):  # fmt: skip
            s, se = self.slopes.get(method, (math.nan, math.nan))
            if math.isfinite(s):
                parts.append(f"{label} {_num(s)}" + (f" ± {se:.3f}" if se > 0 else ""))
        lines.append(f"{slope} " + ",  ".join(parts))
        ref = f"λ = {self.lam:g}" if self.lam is not None else "λ unknown"
        lines.append(f"(compare: {ref}; BIC assumes d/2 = {d / 2:g})   {self.seconds:.0f} s")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self, ax=None):
        """:func:`plot_evidence` of these curves."""
        return plot_evidence(self, ax=ax)


def _num(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` places, "-" if not finite, never "-0.000"."""
    return "-" if not math.isfinite(x) else f"{round(x, digits) + 0.0:.{digits}f}"


def _pm(x: float, e: float) -> str:
    return "-" if not math.isfinite(x) else f"{_num(x)} ± {e:.2f}"


def fit_slope(x: np.ndarray, y: np.ndarray, err: np.ndarray | None = None) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error.

    With ``err`` (standard deviations of y) the fit is weighted and the standard error comes
    from them; without, the points are exact and the standard error is 0.

    >>> fit_slope(np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0]))
    (2.0, 0.0)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    err = None if err is None else np.asarray(err, float)
    ok = np.isfinite(y) & (np.isfinite(err) & (err > 0) if err is not None else True)
    if ok.sum() < 2:
        return math.nan, math.nan
    w = 1.0 / err[ok] ** 2 if err is not None else np.ones(ok.sum())
    xs, ys = x[ok], y[ok]
    xm = (w * xs).sum() / w.sum()
    sxx = (w * (xs - xm) ** 2).sum()
    slope = float((w * (xs - xm) * ys).sum() / sxx)
    return slope, float(math.sqrt(1 / sxx)) if err is not None else 0.0


def _sample_sizes(ns) -> list[int]:
    """``ns`` sorted, as ints: whole numbers >= 3, at least two of them distinct."""
    sizes = _checks.whole_numbers("ns", ns, minimum=3)
    if len(set(sizes)) < 2:
        raise ValueError(
            f"ns must be sample sizes with at least two distinct (the slopes fit a line in "
            f"log n), got {ns!r}"
        )
    return sorted(sizes)


def _zoo_problem(k: Sequence[int], seed: int):
    """(make(n) -> (model, loader, loss_fn, exact_nll), name, λ, m) for ``zoo.potential(k)``."""
    from slt import zoo

    def make(n: int):
        case = zoo.potential(k, n=n, seed=seed)
        return case.model, case.loader(), case.loss_fn, zoo.exact_nll(case)[2]

    case = zoo.potential(k, n=4)
    return make, case.name, float(case.lam), case.m


def evidence_curves(
    model: torch.nn.Module | None = None,
    dataset=None,
    loss_fn=None,
    *,
    ns: Sequence[int] = DEFAULT_NS,
    potential: Sequence[int] = DEFAULT_POTENTIAL,
    prior_std: float = 1.0,
    batch_size: int = 128,
    num_rungs: int = 11,
    num_chains: int = 6,
    num_draws: int = 200,
    num_burnin: int = 50,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvidenceCurves:
    """F_n by thermodynamic integration, exactly where possible, WBIC, BIC and Laplace over n.

    By default the model is the zoo's singular potential y = (a b²) x + ε
    (K ∝ a²b⁴: λ = 1/4, m = 1, d/2 = 1), with a fresh data set of each size n, and F_n is also
    computed exactly by quadrature. With ``model``, ``dataset`` and ``loss_fn``, the first n
    samples of ``dataset`` are used at each n and the model stays at its parameters w*
    (BIC and Laplace are evaluated there: they assume w* minimizes L_n).

    Returns an :class:`EvidenceCurves` with, for each method, the least-squares slope of
    F_n - n L_n(w*) against log n (weighted by the Monte Carlo errors where there are
    some): near λ for F_n and WBIC, d/2 for BIC, r/2 for Laplace at a rank-r Hessian.

    Parameters
    ----------
    model, dataset, loss_fn : optional
        A user's model at w*, a map-style dataset (n ≤ its length) and the mean per-sample
        NLL ``loss_fn(model, batch)``.
    ns : sequence of int
        Sample sizes n ≥ 3, at least two distinct (whole floats such as ``1e3`` are taken
        as ints; anything else is refused).
    potential : sequence of int
        Exponents k of the zoo potential K ∝ Π w_j^{2k_j} when no model is given.
    prior_std : float
        σ of the prior N(0, σ² I) for F_n, WBIC and Laplace.
    batch_size : int
        Minibatch size of the loaders (MALA, the default sampler on a ``TensorDataset``,
        uses the full batch).
    num_rungs, num_chains, num_draws, num_burnin : int
        For :func:`slt.free_energy`; :func:`slt.wbic` uses the same chains, draws and
        burn-in.
    seed, progress
    log : callable, optional
        Called with a line per finished n (the command line prints them).

    Examples
    --------
    >>> curves = evidence_curves(ns=(50, 200), num_rungs=5, num_chains=2, num_draws=20,
    ...                          num_burnin=5, progress=False)
    >>> round(curves.slopes["bic"][0], 9)   # BIC's slope is d/2 exactly
    1.0
    """
    t0 = time.perf_counter()
    ns = _sample_sizes(ns)
    if model is None:
        from slt.zoo.potentials import exponents

        make, name, lam, m = _zoo_problem(exponents(potential), seed)
    else:
        if dataset is None or loss_fn is None:
            raise ValueError("with a model, pass its dataset and loss_fn too")
        if ns[-1] > len(dataset):
            raise ValueError(f"ns go up to {ns[-1]} but the dataset has {len(dataset)} samples")
        name, lam, m = type(model).__name__, None, None

        def make(n: int):
            subset = torch.utils.data.Subset(dataset, range(n))
            if isinstance(dataset, torch.utils.data.TensorDataset):
                subset = torch.utils.data.TensorDataset(*(t[:n] for t in dataset.tensors))
            loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True)
            return model, loader, loss_fn, None

    rows = {key: [] for key in ("nll", "exact", "ti", "ti_err", "wbic", "wbic_se", "lam",
                                "lam_se", "bic", "laplace")}  # fmt: skip
    d, notes = None, []
    for i, n in enumerate(ns):
        net, loader, loss, exact_nll = make(n)
        ti = free_energy(net, loader, loss, prior_std=prior_std, num_rungs=num_rungs,
                         num_chains=num_chains, num_draws=num_draws, num_burnin=num_burnin,
                         seed=seed + i, progress=progress)  # fmt: skip
        wb = wbic(net, loader, loss, prior_std=prior_std, num_chains=num_chains,
                  num_draws=num_draws, num_burnin=num_burnin, seed=seed + i,
                  progress=progress)  # fmt: skip
        d = ti.num_params
        b = bic(net, loader, loss)  # float64: n L_n(w*) for the table
        lap = laplace(net, loader, loss, prior_std=prior_std)
        exact = math.nan
        if exact_nll is not None:  # each F minus its own n L_n(w*), in its own precision
            quad = quadrature_free_energy(exact_nll, n=n, dim=d, prior_std=prior_std, rtol=1e-7)
            exact = quad.free_energy - n * float(exact_nll(torch.zeros(1, d, dtype=torch.float64)))
        for method, result in (("TI", ti), ("WBIC", wb), ("Laplace", lap)):
            notes += [f"n = {n}, {method}: {w}" for w in result.warnings]
        rows["nll"].append(b.nll)
        rows["exact"].append(exact)
        rows["ti"].append(ti.free_energy - ti.nll_at_center)
        rows["ti_err"].append(ti.error)
        rows["wbic"].append(wb.wbic - wb.nll_at_center)
        rows["wbic_se"].append(wb.wbic_se)
        rows["lam"].append(wb.lambda_hat)
        rows["lam_se"].append(wb.lambda_se)
        rows["bic"].append(b.bic - b.nll)
        rows["laplace"].append(lap.free_energy - lap.nll)
        if log is not None:
            log(
                f"n = {n}: F_n - n L_n(w*) exact {_num(exact)}, TI "
                f"{_pm(rows['ti'][-1], ti.error)}, WBIC {_pm(rows['wbic'][-1], wb.wbic_se)}, "
                f"BIC {_num(rows['bic'][-1])}, Laplace {_num(rows['laplace'][-1])} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    arr = {k: np.array(v, dtype=float) for k, v in rows.items()}
    x = np.log(np.array(ns, dtype=float))
    slopes = {
        "exact": fit_slope(x, arr["exact"]),
        "thermodynamic": fit_slope(x, arr["ti"], arr["ti_err"]),
        "wbic": fit_slope(x, arr["wbic"], arr["wbic_se"]),
        "bic": fit_slope(x, arr["bic"]),
        "laplace": fit_slope(x, arr["laplace"]),
    }
    return EvidenceCurves(
        name=name,
        ns=np.array(ns),
        nll_at_center=arr["nll"],
        exact=arr["exact"],
        thermodynamic=arr["ti"],
        thermodynamic_error=arr["ti_err"],
        wbic=arr["wbic"],
        wbic_se=arr["wbic_se"],
        lambda_wbic=arr["lam"],
        lambda_wbic_se=arr["lam_se"],
        bic=arr["bic"],
        laplace=arr["laplace"],
        slopes=slopes,
        num_params=int(d),
        lam=lam,
        m=m,
        prior_std=prior_std,
        seconds=time.perf_counter() - t0,
        settings=dict(
            num_rungs=num_rungs,
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin=num_burnin,
            seed=seed,
            batch_size=batch_size,
        ),  # fmt: skip
        warnings=tuple(notes),
    )


def plot_evidence(curves: EvidenceCurves, ax=None):
    """F_n - n L_n(w*) against log n for every method, with the fitted slopes in the legend.

    Needs matplotlib (``pip install 'slt[plot]'``). Returns the Figure.
    """
    from slt.plots import _pyplot, one_axes

    plt = _pyplot()
    own = ax is None
    fig = plt.figure(figsize=(7, 4.8)) if own else one_axes(ax).figure
    ax = fig.add_subplot() if own else ax
    x = np.asarray(curves.ns, dtype=float)
    s = curves.slopes

    def label(name: str, key: str) -> str:
        slope, se = s.get(key, (math.nan, math.nan))
        return f"{name} (slope {_num(slope, 2)}" + (f" ± {se:.2f})" if se > 0 else ")")

    if np.isfinite(curves.exact).any():
        ax.plot(x, curves.exact, "k-", lw=2, label=label("exact F_n (quadrature)", "exact"))
    ax.errorbar(x, curves.thermodynamic, yerr=2 * curves.thermodynamic_error, fmt="o",
                color="tab:blue", capsize=3,
                label=label("F_n, thermodynamic integration (± 2σ)", "thermodynamic"))  # fmt: skip
    ax.errorbar(x * 1.04, curves.wbic, yerr=2 * curves.wbic_se, fmt="s", color="tab:green",
                capsize=3, label=label("WBIC (± 2σ; drawn at 1.04 n)", "wbic"))  # fmt: skip
    ax.plot(x, curves.bic, "--", color="tab:red", label=label("BIC", "bic"))
    ax.plot(x, curves.laplace, ":", color="tab:orange", label=label("Laplace", "laplace"))
    if curves.lam is not None:
        ref = curves.lam * np.log(x)
        ref += np.nanmean((curves.exact if np.isfinite(curves.exact).any()
                           else curves.thermodynamic) - ref)  # fmt: skip
        ax.plot(x, ref, color="gray", lw=0.8, alpha=0.7, label=f"λ log n + c (λ = {curves.lam:g})")
    ax.set(xscale="log", xlabel="n", ylabel="F_n - n L_n(w*)",
           title=f"{curves.name}: d/2 = {curves.num_params / 2:g}"
           + ("" if curves.lam is None else f", λ = {curves.lam:g}"))  # fmt: skip
    ax.legend(fontsize=8)
    if own:  # the caller's figure keeps its own layout
        fig.tight_layout()
    return fig
