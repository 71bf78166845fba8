"""Plots of development: λ̂ and the loss across training, and free-energy phase diagrams.

Needs matplotlib (``pip install 'slt[plot]'``), imported when a plot is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from slt.plots import _pyplot, axes_pair, mark_missing, one_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_STAGE_COLORS = ("#4c72b0", "#dd8452")


def plot_trajectory(
    trajectory,
    transitions=None,
    *,
    ax: tuple[Axes, Axes] | None = None,
    band: float = 2.0,
    figsize: tuple[float, float] = (8, 5.5),
) -> Figure:
    """λ̂ and L_n(w*) against training step, with uncertainty bands and stages shaded.

    Top: λ̂ at each checkpoint with a band of ± ``band`` standard errors (the larger of
    the standard error over chains and the MCSE, ``trajectory.se``); checkpoints whose
    estimate carries warnings are drawn hollow; if some of those lie far outside the range
    of the others (λ̂ at a saddle can be large and negative), the axis is fitted to the
    others and they are drawn as triangles at its edge. Bottom: the loss L_n(w*) at each
    checkpoint. With ``transitions`` (:func:`slt.detect_transitions`), stages are shaded
    in alternating colours, numbered, and their boundaries drawn as dashed lines.

    Parameters
    ----------
    trajectory : Trajectory
        From :func:`slt.llc_trajectory` (or anything with ``steps``, ``llc``, ``se``,
        ``loss`` and ``warnings``).
    transitions : Transitions, optional
    ax : pair of matplotlib Axes, optional
        Where to draw λ̂ and the loss; a new figure if not given.
    band : float
        Half-width of the band in standard errors.
    """
    plt = _pyplot()
    if ax is None:
        fig, (ax_llc, ax_loss) = plt.subplots(2, 1, figsize=figsize, sharex=True)
    else:
        ax_llc, ax_loss = axes_pair(ax)
        fig = ax_llc.figure
    order = np.argsort(np.asarray(trajectory.steps), kind="stable")  # training order
    steps = np.asarray(trajectory.steps)[order]
    llc = np.asarray(trajectory.llc, float)[order]
    se = np.asarray(trajectory.se, float)[order]
    loss = np.asarray(trajectory.loss, float)[order]
    warned = np.array([len(w) > 0 for w in trajectory.warnings], dtype=bool)[order]
    known = np.isfinite(llc)
    banded = known & np.isfinite(se)
    if banded.any():
        ax_llc.fill_between(steps[banded], (llc - band * se)[banded], (llc + band * se)[banded],
                            color="k", alpha=0.15, lw=0, label=f"± {band:g} se")  # fmt: skip
    ax_llc.plot(steps[known], llc[known], "-", color="k", lw=1.2)
    for subset, style, label in ((known & ~warned, {"color": "k"}, "λ̂"),
                                 (known & warned, {"mfc": "white", "mec": "k"},
                                  "λ̂ (with warnings)")):  # fmt: skip
        if subset.any():
            ax_llc.plot(steps[subset], llc[subset], "o", ms=4, label=label, **style)
    if (known & ~np.isfinite(se)).any():
        nose = known & ~np.isfinite(se)
        ax_llc.plot(steps[nose], llc[nose], "s", mfc="none", mec="C1", ms=7,
                    label="no standard error")  # fmt: skip
    _clip_to_clean(ax_llc, steps, llc, se * band, warned)
    if (~known).any():  # no λ̂ there (its row's error says why): an x at the bottom edge
        mark_missing(ax_llc, steps[~known], "no λ̂ (see the table's error)")
    ax_loss.plot(steps, loss, "o-", color="C3", ms=3, lw=1.2, label="L_n(w*)")
    if transitions is not None:
        for axis in (ax_llc, ax_loss):
            _shade_stages(axis, transitions, steps)
    ax_llc.set_ylabel("λ̂")
    ax_loss.set_ylabel("L_n(w*)")
    ax_loss.set_xlabel("training step")
    ax_llc.legend(loc="best", fontsize=8)
    ax_llc.set_title("λ̂ and loss across training" + (
        f" ({len(transitions.stages)} stages)" if transitions is not None else ""))  # fmt: skip
    return fig


def _clip_to_clean(axis: Axes, steps, llc, half, warned) -> None:
    """Fit the λ̂ axis to the estimates without warnings when others fall far outside (a
    saddle gives a large negative λ̂); those are drawn as triangles at the edge."""
    clean = ~warned & np.isfinite(llc)
    if not clean.any() or clean.all():
        return
    lo, hi = np.nanmin((llc - half)[clean]), np.nanmax((llc + half)[clean])
    pad = 0.15 * (hi - lo) or 0.5
    lo, hi = lo - pad, hi + pad
    below, above = warned & (llc < lo), warned & (llc > hi)
    if not (below.any() or above.any()):
        return
    axis.set_ylim(lo, hi)
    edge = 0.04 * (hi - lo)
    for outside, y, marker, where in ((below, lo + edge, "v", "below"),
                                      (above, hi - edge, "^", "above")):  # fmt: skip
        if outside.any():
            axis.plot(steps[outside], np.full(outside.sum(), y), marker, mfc="white", mec="k",
                      ms=6, label=f"λ̂ {where} the axis (warnings)")  # fmt: skip


def _shade_stages(axis: Axes, transitions, steps: np.ndarray) -> None:
    """Alternating spans per stage, from midway between checkpoints; numbered at the top."""
    mids = (steps[1:] + steps[:-1]) / 2
    for i, (a, b) in enumerate(transitions.stages):
        ia, ib = np.searchsorted(steps, a), np.searchsorted(steps, b)
        left = steps[0] if ia == 0 else mids[ia - 1]
        right = steps[-1] if ib >= len(steps) - 1 else mids[ib]
        axis.axvspan(left, right, color=_STAGE_COLORS[i % 2], alpha=0.12, lw=0)
        axis.text((left + right) / 2, 0.98, str(i + 1), transform=axis.get_xaxis_transform(),
                  ha="center", va="top", fontsize=8, color="0.3")  # fmt: skip
        if i > 0:
            axis.axvline(left, color="0.4", ls="--", lw=0.8)


def plot_phase_diagram(diagram, *, ax: Axes | None = None,
                       figsize: tuple[float, float] = (6, 4)) -> Figure:  # fmt: skip
    """F_i(n) - min_j F_j(n) against n for each candidate; crossings marked.

    The candidate at 0 dominates the posterior at that n. The y-axis shows up to 2.5 times
    the largest gap at the smallest n; a curve can leave it and come back (one that wins at
    large n may lie above it in between), so read the crossings, not the visible curves.
    Each crossing is a dotted line with its ± 2 se range (from the λ̂ standard errors)
    shaded; an end that 2 se remove (NaN) is shaded to the edge of the axes.
    """
    plt = _pyplot()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
    else:
        fig = one_axes(ax).figure
    gap = diagram.free_energy - diagram.free_energy.min(axis=0, keepdims=True)
    for i, c in enumerate(diagram.candidates):
        ax.plot(diagram.n, gap[i], lw=1.5, label=f"{c.name} (L {c.loss:.4g}, λ̂ {c.llc:.3g})")
    top = 2.5 * float(np.nanmax(gap[:, 0])) or float(np.nanpercentile(gap, 60)) or 1.0
    for cross in diagram.crossings:
        ax.axvline(cross.n, color="k", ls=":", lw=1)
        # a NaN end is a crossing that 2 se remove: the range runs off that side of the axes
        lo = np.nan_to_num(cross.n_low, nan=diagram.n[0])
        hi = np.nan_to_num(cross.n_high, nan=diagram.n[-1])
        ax.axvspan(lo, hi, color="k", alpha=0.08, lw=0)
        # mid-height on a light box: at the top the legend hid it (only "7 →6-gon" showed)
        ax.text(cross.n, top * 0.55, f" n≈{cross.n:.3g}\n {cross.before}→{cross.after}",
                fontsize=7, va="center",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))  # fmt: skip
    ax.set(xscale="log", ylim=(-0.02 * top, top), xlabel="sample size n",
           ylabel="F_i(n) − min_j F_j(n)")  # fmt: skip
    ax.set_title("Phase diagram\nF ≈ nL + λ̂ log n − (m−1) log log n", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig
