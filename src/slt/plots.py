"""Trace plots of an LLC estimate. Needs matplotlib (``pip install 'slt[plot]'``).

matplotlib is imported when a plot is drawn, not when this module is imported, so
``import slt`` stays light.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'slt[plot]'"
        ) from err
    return plt


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64)
    x[~np.isfinite(x)] = np.nan
    return x


def _running_mean(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x, axis=-1) / np.arange(1, x.shape[-1] + 1)


def axes_pair(ax, name: str = "ax"):
    """``ax`` as two matplotlib Axes, or a TypeError that says a pair is wanted."""
    try:
        first, second = ax
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a pair of matplotlib Axes (top, bottom), got {ax!r}"
        ) from None
    return first, second


def one_axes(ax, name: str = "ax"):
    """``ax`` if it is one matplotlib Axes, else a TypeError naming it."""
    if not hasattr(ax, "figure") or not hasattr(ax, "plot"):
        raise TypeError(f"{name} must be one matplotlib Axes, got {ax!r}")
    return ax


def mark_missing(ax: Axes, x, label: str) -> None:
    """A red ``x`` at the bottom edge of ``ax`` at each of ``x``: points with no value to
    draw (every chain diverged), so that they do not silently vanish."""
    x = np.asarray(x)
    ax.plot(x, np.zeros(x.size), "x", color="red", ms=8, mew=2,
            transform=ax.get_xaxis_transform(), clip_on=False, label=label)  # fmt: skip


def _limits(ax: Axes, values: np.ndarray) -> None:
    """Fit the y-axis to ``values`` (the usable chains), so a diverging chain cannot flatten it."""
    lo, hi = np.nanmin(values), np.nanmax(values)
    pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 1.0
    ax.set_ylim(lo - pad, hi + pad)


def _mark_divergence(ax: Axes, steps: np.ndarray, row: np.ndarray) -> None:
    """An ``x`` at the last finite value of a diverged chain, kept inside the axis."""
    finite = np.flatnonzero(np.isfinite(row))
    lo, hi = ax.get_ylim()
    if finite.size == 0:  # it diverged in the burn-in: an x at the first step, at the top
        ax.plot(steps[0], hi, "x", color="red", ms=9, mew=2, clip_on=False)
        ax.annotate("diverged in burn-in", (steps[0], hi), fontsize=7, color="red",
                    xytext=(4, -10), textcoords="offset points")  # fmt: skip
        return
    last = finite[-1]
    ax.plot(steps[last], min(max(row[last], lo), hi), "x", color="red", ms=9, mew=2)


def plot_trace(
    result, *, ax: tuple[Axes, Axes] | None = None, figsize: tuple[float, float] = (10, 6)
) -> Figure:
    """Loss and per-draw λ̂ traces of an LLC estimate, per chain, after burn-in.

    Top: the minibatch loss L_B(w_t) of each chain, with L_n(w*) dashed. Bottom: the
    per-draw λ̂ = nβ (L_B(w_t) - L_B(w*)) of each chain (faint) and its running mean
    (solid), with the estimate λ̂ and a band of ± 2 standard errors. Only post-burn-in
    draws are stored, so the x-axis starts at step ``num_burnin``. Diverged chains are
    dotted, marked with a red ``x`` where they were last finite, and left out of the axis
    limits. The title gives λ̂ ± se, R̂ and the bulk ESS (:func:`slt.diagnostics.diagnose`).

    Parameters
    ----------
    result : LLCResult
        Or anything with its fields ``trace``, ``llc_trace``, ``diverged``, ``llc``,
        ``llc_std``, ``num_burnin`` (and optionally ``init_loss``, ``nbeta``).
    ax : pair of matplotlib Axes, optional
        Where to draw the loss and the λ̂ trace; a new figure if not given.
    figsize : (float, float)
        Size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from slt.diagnostics import diagnose

    plt = _pyplot()
    own = ax is None
    if own:
        fig, (ax_loss, ax_llc) = plt.subplots(2, 1, figsize=figsize, sharex=True)
    else:
        ax_loss, ax_llc = axes_pair(ax)
        fig = ax_loss.figure
    loss = _finite(result.trace)
    llc_trace = _finite(result.llc_trace)
    diverged = np.asarray(result.diverged, dtype=bool)
    ok = ~diverged
    num_chains, num_draws = loss.shape
    steps = result.num_burnin + np.arange(num_draws)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c in range(num_chains):
        style = {"color": colors[c % len(colors)], "ls": ":" if diverged[c] else "-"}
        label = f"chain {c}" + (" (diverged)" if diverged[c] else "")
        marker = {"marker": "o", "ms": 3} if num_draws == 1 else {}  # one draw: a point
        ax_loss.plot(steps, loss[c], lw=0.7, label=label, **style, **marker)
        ax_llc.plot(steps, llc_trace[c], lw=0.5, alpha=0.3, **style, **marker)
        ax_llc.plot(steps, _running_mean(llc_trace[c]), lw=1.6, **style, **marker)
    init_loss = getattr(result, "init_loss", None)
    if init_loss is not None:
        ax_loss.axhline(init_loss, color="k", ls="--", lw=1, label="L_n(w*)")

    diag = diagnose(result.llc_trace, diverged=diverged)
    se, se_name = result.llc_std, "se over chains"
    if not math.isfinite(se):  # the result's own MCSE (over epochs where it took them)
        se, se_name = getattr(result, "mcse", diag.mcse), "MCSE"
    ax_llc.axhline(result.llc, color="k", lw=1.2, label=f"λ̂ = {result.llc:.4g}")
    if math.isfinite(se):
        ax_llc.axhspan(result.llc - 2 * se, result.llc + 2 * se, color="0.5", alpha=0.25,
                       label=f"± 2 {se_name}")  # fmt: skip
    if diverged.any() and ok.any():
        with_center = loss[ok] if init_loss is None else np.append(loss[ok], init_loss)
        _limits(ax_loss, with_center)  # L_n(w*) stays in view
        _limits(ax_llc, llc_trace[ok])
        for c in np.flatnonzero(diverged):
            _mark_divergence(ax_loss, steps, loss[c])
            _mark_divergence(ax_llc, steps, llc_trace[c])

    ax_loss.set_ylabel("minibatch loss $L_B(w_t)$")
    ax_llc.set_ylabel("per-draw $\\hat\\lambda$ (running mean solid)")
    ax_llc.set_xlabel(f"step (burn-in of {result.num_burnin} steps not shown)")
    ax_loss.legend(loc="upper right", fontsize="small", ncol=2)
    ax_llc.legend(loc="upper right", fontsize="small")
    rhat = getattr(result, "rhat", diag.rhat)
    ess = getattr(result, "ess_bulk", diag.ess_bulk)
    title = (
        f"λ̂ = {result.llc:.4g} ± {se:.2g}   R̂ {rhat:.3f}   bulk ESS {ess:.0f}   "
        f"({int(ok.sum())}/{num_chains} chains × {num_draws} draws)"
    )
    if own:
        fig.suptitle(title)
    else:  # the caller's figure keeps its own title
        ax_loss.set_title(title, fontsize="medium")
    return fig
