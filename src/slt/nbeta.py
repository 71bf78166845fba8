"""λ̂ over a range of nβ: where the estimate has converged, and the input for fitting λ, m.

Exact sampling of the tempered posterior gives nβ E[K] = λ - (m - 1)/log nβ + o(1/log nβ)
(Watanabe 2009; THEORY.md), so a sweep over nβ shows how far a single estimate is from the
asymptotic λ, and a fit of λ - (m - 1)/log nβ recovers both.

The step size is rescaled with nβ by default: the stiffest posterior direction has
precision ≈ nβ q_max, so keeping ε·nβ fixed keeps the discretization error fixed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from slt import _checks
from slt._text import right
from slt.chains import DivergenceError
from slt.llc import LLCResult, estimate_llc
from slt.losses import LossFn


@dataclass(frozen=True)
class NbetaSweep:
    """λ̂ against nβ. Arrays are ``(point,)`` over the nβ grid, ascending."""

    nbeta: np.ndarray  # (point,)
    llc: np.ndarray  # (point,)
    llc_std: np.ndarray  # (point,)
    step_size: np.ndarray  # (point,)
    n: int
    results: tuple[LLCResult | None, ...] = field(repr=False)  # None: every chain diverged
    warnings: tuple[str, ...] = ()  # each point's, "at nβ = ...: ..."

    @property
    def relative_change(self) -> np.ndarray:
        """(point - 1,) relative change of λ̂ from each nβ to the next."""
        return np.diff(self.llc) / np.abs(self.llc[:-1])

    def __str__(self) -> str:
        lines = [
            f"λ̂ against nβ (n = {self.n})",
            f"{'nβ':>10} {'step_size':>10} {right('λ̂ ± se', 20)} {'Δ':>8}",
        ]
        for i, (nb, eps, v, se) in enumerate(
            zip(self.nbeta, self.step_size, self.llc, self.llc_std)
        ):
            step = self.relative_change[i - 1] if i else math.nan
            change = "" if i == 0 else f"{step:+.1%}" if math.isfinite(step) else "—"
            lines.append(f"{nb:>10.4g} {eps:>10.3g} {v:>11.4g} ± {se:<7.2g} {change:>8}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "nbeta": self.nbeta.tolist(),
            "llc": self.llc.tolist(),
            "llc_std": self.llc_std.tolist(),
            "step_size": self.step_size.tolist(),
            "n": self.n,
            "warnings": list(self.warnings),
        }

    def plot(self, ax=None):
        """λ̂ ± 2 se against log nβ; returns the matplotlib Figure. A point without λ̂ (every
        chain diverged) is a red x at the bottom edge, one without a standard error a
        hollow square."""
        from slt.plots import _pyplot, mark_missing, one_axes

        plt = _pyplot()
        own = ax is None
        fig = plt.figure(figsize=(5, 3.5)) if own else one_axes(ax).figure
        ax = fig.add_subplot() if own else ax
        ax.errorbar(self.nbeta, self.llc, yerr=2 * self.llc_std, fmt="o-", capsize=3)
        lost, bare = ~np.isfinite(self.llc), np.isfinite(self.llc) & ~np.isfinite(self.llc_std)
        if lost.any():
            mark_missing(ax, self.nbeta[lost], "no λ̂ (diverged)")
        if bare.any():
            ax.plot(self.nbeta[bare], self.llc[bare], "s", mfc="none", mec="C1", ms=7,
                    label="no standard error")  # fmt: skip
        if lost.any() or bare.any():
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel="nβ", ylabel="λ̂ (± 2 se)", title="λ̂ against nβ")
        if own:  # the caller's figure keeps its own layout
            fig.tight_layout()
        return fig


def default_nbetas(n: int, num: int = 6) -> np.ndarray:
    """A geometric grid from (n/log n)/8 to 8 n/log n, ``num`` points."""
    center = n / math.log(n)
    return center * np.geomspace(1 / 8, 8, num)


def llc_vs_nbeta(
    model,
    loader: Iterable,
    loss_fn: LossFn,
    *,
    nbetas: Sequence[float] | None = None,
    step_size: float = 1e-4,
    rescale_step_size: bool = True,
    progress: bool = True,
    **kwargs,
) -> NbetaSweep:
    """Estimate λ̂ at each nβ in ``nbetas`` (default :func:`default_nbetas`).

    ``step_size`` applies at the default nβ = n/log n; with ``rescale_step_size`` each
    point uses ε · (n/log n) / nβ. Other keyword arguments go to
    :func:`slt.estimate_llc` (the same ``seed`` at every point).

    Examples
    --------
    >>> import slt
    >>> case = slt.zoo.regular(3, n=512)
    >>> sweep = slt.llc_vs_nbeta(case.model, case.loader(), case.loss_fn, nbetas=[20, 80],
    ...                          step_size=1e-3, num_chains=2, num_draws=200, num_burnin=50,
    ...                          progress=False)
    >>> sweep.nbeta.tolist()
    [20.0, 80.0]
    """
    if "nbeta" in kwargs:  # it went on to estimate_llc, which named itself
        raise TypeError(
            f"llc_vs_nbeta sweeps nβ over nbetas=[...]; it takes no nbeta= (got "
            f"{kwargs['nbeta']!r}): pass nbetas=[{kwargs['nbeta']!r}, ...]"
        )
    if kwargs.get("n") is not None:
        kwargs["n"] = _checks.integer("n", kwargs["n"], minimum=2)
    n = kwargs.get("n") or _dataset_size(loader)
    if nbetas is None:
        grid = default_nbetas(n)
    else:
        try:  # bools too are refused (True was nβ = 1)
            grid = np.asarray(_checks.positive_reals("nbetas", nbetas))
        except ValueError:
            raise ValueError(
                f"nbetas must be a sequence of finite numbers > 0, got {nbetas!r}"
            ) from None
    grid = np.sort(grid)
    if np.any(np.diff(grid) == 0):
        raise ValueError(f"nbetas must be distinct, got {nbetas!r}")
    if isinstance(step_size, str):  # "auto" would calibrate each nβ apart; the sweep holds ε·nβ
        raise ValueError(
            f"step_size={step_size!r}: llc_vs_nbeta takes a number, rescaled as ε·nβ constant "
            "across the sweep; calibrate it at one nβ first (slt.calibrate(...).step_size)"
        )
    step_size = _checks.real("step_size", step_size, minimum=0, strict=True)
    if not isinstance(rescale_step_size, bool):
        raise TypeError(f"rescale_step_size must be True or False, got {rescale_step_size!r}")
    reference = n / math.log(n)
    steps = [step_size * reference / nb if rescale_step_size else step_size for nb in grid]
    results, notes = [], []
    for nb, eps in zip(grid, steps):
        try:
            res = estimate_llc(model, loader, loss_fn, nbeta=float(nb), step_size=float(eps),
                               progress=progress, **kwargs)  # fmt: skip
        except DivergenceError as err:  # that point is lost, not the finished ones
            notes.append(f"at nβ = {nb:.4g}: {err}")
            results.append(None)
            continue
        results.append(res)
        notes += [f"at nβ = {nb:.4g}: {w}" for w in res.warnings]
    if all(r is None for r in results):
        raise DivergenceError("every chain diverged at every nβ: " + "; ".join(notes))
    nan = math.nan
    return NbetaSweep(
        nbeta=grid,
        llc=np.array([nan if r is None else r.llc for r in results]),
        llc_std=np.array([nan if r is None else r.llc_std for r in results]),
        step_size=np.array(steps),
        n=next((r.n for r in results if r is not None), n),
        results=tuple(results),
        warnings=tuple(notes),
    )


def _dataset_size(loader) -> int:
    from slt.data import dataset_size

    size = dataset_size(loader)
    if size is None:
        raise ValueError("llc_vs_nbeta: pass n= when the loader has no sized dataset")
    return size
