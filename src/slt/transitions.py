"""Change points in λ̂(t) and L_n(t): where development moves from one stage to the next.

Each signal (λ̂ and the loss at each checkpoint, in training order) is standardized by a
robust noise scale and segmented into pieces of constant mean by PELT (Killick, Fearnhead
& Eckley 2012) from ``ruptures`` (Truong, Oudre & Vayatis 2020), with a BIC-like penalty
of 2 log T per change point and signal (T checkpoints): a change point is kept when it
lowers the standardized sum of squares by more than that. The stages are the segments of
a joint segmentation of all signals; each signal's own change points are reported too.

The noise scale of a signal is the larger of

- the MAD of its first differences / √2 (the checkpoint-to-checkpoint jitter; with
  common random numbers across checkpoints, see :mod:`slt.trajectory`, this is far below
  each λ̂'s standard error), and
- ``min_scale`` (default 5%) of its 5-95% range, so that an exact signal (the loss) or a
  slow drift within a plateau does not split into many stages.

If both are 0 (no jitter, and ``min_scale=0`` or every change in the outer 5% of the
values), ``FALLBACK_SCALE`` of the signal's full range; 1 for a constant signal.

What it is not: a test. Pieces of constant mean cut a smooth trend with no transition
into stages (an exponential decay over 30 checkpoints: 7 of them), and the standard errors
of λ̂ are not used, so a jump well inside them can still be a change point. On i.i.d.
noise of 30 checkpoints, 20% of runs found at least one change point (9% with the true
noise scale; on AR(1) noise with φ = 0.7, 93%). Read the stages against the error bars.

Needs ``ruptures``: ``pip install 'slt[transitions]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from slt import _checks

FALLBACK_SCALE = 0.05
"""The noise scale, as a fraction of max - min, of a signal with no jitter and no floor."""


@dataclass(frozen=True)
class Transitions:
    """Stages of a trajectory. Steps are training steps of checkpoints."""

    steps: np.ndarray  # (checkpoint,) the checkpoints' steps that were segmented
    boundaries: tuple[int, ...]  # first step of each stage after the first (joint)
    stages: tuple[tuple[int, int], ...]  # (first step, last step) of each stage
    change_points: dict[str, tuple[int, ...]]  # per signal, first step of each new segment
    levels: dict[str, tuple[float, ...]]  # per signal, its median within each stage
    scale: dict[str, float]  # per signal, the noise scale it was standardized by
    penalty: float  # per change point and signal, in standardized units
    dropped: tuple[int, ...] = ()  # steps left out because a signal was not finite there

    def stage_of(self, step: int) -> int:
        """Index of the stage that contains ``step`` (the last one it does not precede)."""
        return int(np.searchsorted(np.asarray(self.boundaries), step, side="right"))

    def to_dict(self) -> dict:
        return {
            "steps": self.steps.tolist(),
            "boundaries": list(self.boundaries),
            "stages": [list(s) for s in self.stages],
            "change_points": {k: list(v) for k, v in self.change_points.items()},
            "levels": {k: list(v) for k, v in self.levels.items()},
            "scale": dict(self.scale),
            "penalty": self.penalty,
            "dropped": list(self.dropped),
        }

    def __str__(self) -> str:
        names = list(self.levels)
        count = len(self.stages)
        lines = [f"{count} stage{'' if count == 1 else 's'} (change points: " + "; ".join(
            f"{k} at {', '.join(map(str, v)) or 'none'}" for k, v in self.change_points.items()
        ) + ")"]  # fmt: skip
        lines.append(f"{'stage':>5} {'steps':>17} " + " ".join(f"{k:>12}" for k in names))
        for i, (a, b) in enumerate(self.stages):
            values = " ".join(f"{self.levels[k][i]:>12.5g}" for k in names)
            lines.append(f"{i + 1:>5} {f'{a}-{b}':>17} {values}")
        if self.dropped:
            lines.append(f"left out (non-finite): steps {', '.join(map(str, self.dropped))}")
        # what the stages are and are not (a jump inside λ̂'s error bars is still cut)
        lines.append("a segmentation, not a test: read each jump against λ̂'s error bars")
        return "\n".join(lines)


def detect_transitions(
    trajectory,
    *,
    signals: tuple[str, ...] = ("llc", "loss"),
    penalty: float | None = None,
    min_size: int = 2,
    min_scale: float = 0.05,
) -> Transitions:
    """Change points of λ̂(t) and L_n(t) and the stages between them.

    Parameters
    ----------
    trajectory : Trajectory, or a mapping / object with ``steps`` and the signals
        E.g. the result of :func:`slt.llc_trajectory`, or ``{"steps": ..., "llc": ...,
        "loss": ...}``. Steps must be distinct whole numbers; in any order (the
        checkpoints are sorted by step first).
    signals : names of (checkpoint,) arrays of ``trajectory``
        ``"llc"`` and ``"loss"`` (L_n(w*)) by default.
    penalty : float, optional
        Cost of one change point per signal, in units of the squared noise scale, ≥ 0;
        default 2 log T (T = number of checkpoints).
    min_size : int
        Fewest checkpoints in a segment, ≥ 1.
    min_scale : float
        Floor of the noise scale, as a fraction of the signal's 5-95% range, ≥ 0.

    Returns
    -------
    Transitions

    Examples
    --------
    >>> steps = np.arange(0, 200, 10)
    >>> llc = np.where(steps < 100, 1.0, 3.0) + 0.01 * np.sin(steps)
    >>> loss = np.where(steps < 100, 0.5, 0.2) - 1e-4 * steps
    >>> t = detect_transitions({"steps": steps, "llc": llc, "loss": loss})
    >>> t.change_points, t.stages
    ({'llc': (100,), 'loss': (100,)}, ((0, 90), (100, 190)))
    """
    if penalty is not None:
        penalty = _checks.real("penalty", penalty, minimum=0)
    min_size = _checks.integer("min_size", min_size, minimum=1)
    min_scale = _checks.real("min_scale", min_scale, minimum=0)
    rpt = _ruptures()
    signals = (signals,) if isinstance(signals, str) else tuple(signals)
    if not signals:
        raise ValueError('signals is empty; give at least one name, e.g. ("llc", "loss")')
    names = set(trajectory) if isinstance(trajectory, Mapping) else None

    def get(key):
        if names is None and hasattr(trajectory, key):
            return getattr(trajectory, key)
        if names is not None and key in names:
            return trajectory[key]
        what = "signal" if key != "steps" else "array"
        raise ValueError(f"trajectory has no {what} {key!r} (signals={signals})")

    steps = np.asarray(get("steps"))
    values = {k: np.asarray(get(k), dtype=np.float64) for k in signals}
    for k, v in values.items():
        if v.shape != steps.shape or v.ndim != 1:
            raise ValueError(f"signal {k!r} has shape {v.shape}, steps {steps.shape}")
    if steps.dtype.kind not in "iuf" or (steps.size and not np.all(np.mod(steps, 1) == 0)):
        raise ValueError(f"steps must be whole numbers, got {steps.tolist()}")
    steps = steps.astype(np.int64)
    if len(np.unique(steps)) != len(steps):
        twice = sorted({int(s) for s in steps if np.sum(steps == s) > 1})
        raise ValueError(f"steps must be distinct; {twice} occur more than once")
    order = np.argsort(steps, kind="stable")  # training order, whatever the input's
    steps, values = steps[order], {k: v[order] for k, v in values.items()}
    ok = np.all([np.isfinite(v) for v in values.values()], axis=0)
    dropped = tuple(int(s) for s in steps[~ok])
    steps = steps[ok]
    values = {k: v[ok] for k, v in values.items()}
    T = len(steps)
    if T == 0:
        raise ValueError("no checkpoint has finite values of every signal")
    pen = 2 * math.log(max(T, 2)) if penalty is None else penalty
    scale = {k: noise_scale(v, min_scale) for k, v in values.items()}
    z = {k: (v - np.median(v)) / scale[k] for k, v in values.items()}

    def segment(columns: list[np.ndarray]) -> list[int]:
        if T < 2 * min_size:
            return []
        algo = rpt.Pelt(model="l2", min_size=min_size, jump=1).fit(np.column_stack(columns))
        return algo.predict(pen=pen * len(columns))[:-1]  # indices where a segment starts

    change_points = {k: tuple(int(steps[i]) for i in segment([z[k]])) for k in signals}
    joint = segment([z[k] for k in signals])
    edges = [0, *joint, T]
    stages = tuple((int(steps[a]), int(steps[b - 1])) for a, b in zip(edges[:-1], edges[1:]))
    levels = {
        k: tuple(float(np.median(v[a:b])) for a, b in zip(edges[:-1], edges[1:]))
        for k, v in values.items()
    }
    return Transitions(
        steps=steps,
        boundaries=tuple(int(steps[i]) for i in joint),
        stages=stages,
        change_points=change_points,
        levels=levels,
        scale=scale,
        penalty=pen,
        dropped=dropped,
    )


def noise_scale(values: np.ndarray, min_scale: float = 0.05) -> float:
    """max(MAD of first differences / √2 × 1.4826, ``min_scale`` × 5-95% range), > 0."""
    diffs = np.diff(values)
    jitter = (
        1.4826 * np.median(np.abs(diffs - np.median(diffs))) / math.sqrt(2) if diffs.size else 0.0
    )
    lo, hi = np.percentile(values, [5, 95])
    scale = max(float(jitter), min_scale * float(hi - lo))
    if scale > 0:
        return scale
    # no jitter and no floor (min_scale=0, or every change in the outer 5%): exact steps,
    # which any scale finds, but one in the signal's own units, so as not to depend on them
    spread = float(np.max(values) - np.min(values)) if values.size else 0.0
    return FALLBACK_SCALE * spread if spread > 0 else 1.0  # a constant signal: no change


def _ruptures():
    try:
        import ruptures
    except ImportError as err:
        raise ImportError(
            "detect_transitions needs ruptures, which is not installed: "
            "pip install 'slt[transitions]' (or pip install ruptures)"
        ) from err
    return ruptures
