"""Calibrating the localization γ and the inverse temperature nβ, when asked.

:func:`slt.calibrate` given a sequence for ``localization`` or ``nbeta`` runs its step-size
calibration at every (γ, nβ) of the grid and then chooses the setting by two rules that
mirror the step-size rule ("the largest ε that does not change λ̂"):

γ, a nuisance parameter. The localizing term biases λ̂ down as γ grows (on a regular
model, exactly: each direction of curvature q contributes ½ nβq/(nβq + γ) instead of ½),
while a too-small γ lets chains wander off w* (divergence, drift, stiff regions: the
step-size criteria fail). From the smallest γ whose calibration passed (the reference),
take the largest γ whose λ̂ still agrees with the reference within ``flat_tolerance``
(relative) plus two standard errors, every γ in between passing too. A comparison whose
two standard errors alone exceed the tolerance cannot vouch for the larger γ and stops
the walk. Lau et al. 2023 (arXiv 2308.12108), section on hyperparameters, describe
λ̂ as flat over a range of γ; this picks the stiffest end of that range.

nβ, the temperature of the local posterior. λ̂(nβ) approaches λ as nβ grows
(λ − (m − 1)/log nβ at large nβ; THEORY.md) while larger nβ needs smaller steps. The
chosen nβ is the smallest whose λ̂ agrees, in the same sense, with that of the next larger
nβ in the grid — where λ̂ has levelled off. If it never does, the largest passing nβ is
taken and the result warns.

With both given, γ is chosen at each nβ, then nβ among those.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from slt._text import right
from slt.chains import DivergenceError


@dataclass(frozen=True)
class SettingTrial:
    """One (γ, nβ) of the grid: the step size its own calibration chose, and λ̂ from the
    comparison run (common reduced step ε·nβ and common seed across the grid)."""

    localization: float
    nbeta: float
    step_size: float  # chosen by this setting's step-size calibration
    comparison_step_size: float  # s / nβ, s the smallest ε·nβ chosen over the grid
    llc: float
    llc_mcse: float
    passed: bool  # step-size criteria passed, and the comparison run did not diverge
    chosen: bool
    reasons: tuple[str, ...]


def as_grid(name: str, value) -> list | None:
    """``value`` as a sorted list of floats if it is a sequence or a 1-d array, else None
    (one value: a number, numpy scalars and 0-d arrays included)."""
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a number or a sequence (or 1-d array) of numbers, got {value!r}"
        )
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
        raise TypeError(f"{name} as a grid must hold numbers, got {value!r}")
    grid = [float(v) for v in value]
    zero_ok = name == "localization"
    if not grid or any(not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok) for v in grid):
        accepted = "numbers ≥ 0" if zero_ok else "numbers > 0"
        raise ValueError(
            f"{name} as a grid must be a non-empty sequence of {accepted}, got {value!r}"
        )
    if len(set(grid)) != len(grid):
        raise ValueError(f"{name} grid has repeated values: {value!r}")
    return sorted(grid)


def _compare(a: np.ndarray, b: np.ndarray, tolerance: float) -> tuple[bool, bool, float]:
    """Paired comparison of two (chain, draw) λ̂ traces run with the same noise:
    (agree, conclusive, relative change). The difference's MCSE σ comes from its own ESS,
    so the correlation the common random numbers create is used, not assumed."""
    from slt.diagnostics import diagnose

    diff = a - b
    sigma = diagnose(diff).mcse
    allowed = tolerance * abs(float(a.mean()))
    change = abs(float(diff.mean()))
    return change <= allowed + 2 * sigma, 2 * sigma <= allowed, change / abs(float(a.mean()))


def _walk_localization(row: list[SettingTrial], traces: list, tolerance: float) -> int:
    """Index of the chosen γ in ``row`` (sorted by γ); updates reasons in place."""
    passing = [i for i, t in enumerate(row) if t.passed]
    if not passing:
        return len(row) - 1
    ref = chosen = passing[0]
    for i in range(ref + 1, len(row)):
        if not row[i].passed:
            break
        agree, conclusive, change = _compare(traces[ref], traces[i], tolerance)
        if not (agree and conclusive):
            why = f"λ̂ {change:.1%} off the smallest γ's" if conclusive else "inconclusive"
            row[i] = replace(row[i], reasons=row[i].reasons + (why,))
            break
        chosen = i
    return chosen


def _walk_nbeta(best: list[SettingTrial], traces: list, tolerance: float) -> tuple[int, bool]:
    """Index of the chosen nβ in ``best`` (sorted by nβ) and whether λ̂ levelled off."""
    passing = [i for i, t in enumerate(best) if t.passed]
    if not passing:
        return len(best) - 1, False
    for a, b in zip(passing, passing[1:]):
        agree, conclusive, change = _compare(traces[b], traces[a], tolerance)
        if agree and conclusive:
            return a, True
        why = f"λ̂ {change:.1%} below the next nβ's" if conclusive else "nβ comparison inconclusive"
        best[a] = replace(best[a], reasons=best[a].reasons + (why,))
    return passing[-1], False


def calibrate_grid(
    calibrate_at: Callable[[float, float | None], object],
    sample_at: Callable[[float, float, float, int], object | None],
    localizations: list[float],
    nbetas: list[float | None],
    *,
    flat_tolerance: float,
):
    """Choose (γ, nβ). ``calibrate_at(γ, nβ)`` is the step-size calibration at one setting;
    ``sample_at(γ, nβ, ε, num_burnin)`` a comparison run returning an LLCResult (None if
    it diverged); every comparison run has the same ε·nβ, burn-in, length and seed.
    Returns the chosen setting's CalibrationResult, every trial, and warnings."""
    cals, lost = {}, {}
    for nb in nbetas:
        for g in localizations:
            try:
                cals[g, nb] = calibrate_at(g, nb)
            except DivergenceError as err:  # that setting fails; the others go on
                lost[g, nb] = err
    if not cals:
        raise DivergenceError(
            "every pilot diverged at every (γ, nβ) of the grid: "
            + "; ".join(f"γ = {g:g}, nβ = {nb}: {err}" for (g, nb), err in lost.items())
        )
    found = list(cals.values())
    reduced = min(c.step_size * c.nbeta for c in found)  # ε·nβ common to all runs
    burnin = max(  # each calibration's burn-in, rescaled from its first candidate's ε
        math.ceil(c.settings["num_burnin"] * c.candidates[0].step_size * c.nbeta / reduced)
        for c in found
    )
    rows, row_traces = [], []
    for nb in nbetas:
        row, traces = [], []
        for g in localizations:
            if (g, nb) in lost:
                why = (f"every pilot diverged ({lost[g, nb]})",)
                nan = math.nan
                row.append(SettingTrial(g, nan if nb is None else nb, nan, nan, nan, nan,
                                        False, False, why))  # fmt: skip
                traces.append(None)
                continue
            cal = cals[g, nb]
            pick = next(c for c in cal.candidates if c.step_size == cal.step_size)
            eps = reduced / cal.nbeta
            res = sample_at(g, cal.nbeta, eps, burnin)
            ok = pick.passed and not cal.warnings and res is not None and not res.diverged.any()
            why = pick.reasons + (() if res is not None else ("comparison run diverged",))
            row.append(SettingTrial(g, cal.nbeta, cal.step_size, eps,
                                    res.llc if res is not None else math.nan,
                                    res.mcse if res is not None else math.nan,
                                    ok, False, why))  # fmt: skip
            traces.append(res.llc_trace if res is not None else None)
        rows.append(row)
        row_traces.append(traces)
    picks = [_walk_localization(row, tr, flat_tolerance) for row, tr in zip(rows, row_traces)]
    best = [row[i] for row, i in zip(rows, picks)]
    j, levelled = _walk_nbeta(best, [tr[i] for tr, i in zip(row_traces, picks)], flat_tolerance)
    for k, (row, i) in enumerate(zip(rows, picks)):
        row[i] = replace(best[k], chosen=k == j)
    chosen = best[j]
    if (chosen.localization, nbetas[j]) in lost:  # none passed, and the fallback has no run
        (g, nb), _ = next(iter(cals.items()))
        j = nbetas.index(nb)
        for row in rows:
            row[:] = [replace(t, chosen=False) for t in row]
        k = localizations.index(g)
        rows[j][k] = replace(rows[j][k], chosen=True)
        chosen = rows[j][k]
    warnings = []
    if not chosen.passed:
        warnings.append("no (γ, nβ) of the grid passed the step-size criteria")
    if len(nbetas) > 1 and not levelled:
        warnings.append("λ̂ did not level off in nβ over the grid; took the largest passing nβ")
    trials = tuple(t for row in rows for t in row)
    return cals[chosen.localization, nbetas[j]], trials, tuple(warnings)


def grid_table(trials: Sequence[SettingTrial]) -> list[str]:
    """The lines of the (γ, nβ) table for :class:`slt.calibrate.CalibrationResult`."""
    lines = [
        f"{'γ':>8} {'nβ':>9} {'step_size':>10} {'compared at':>11} {right('λ̂ ± mcse', 18)} "
        f"{'ok':>3}  reasons"
    ]
    for t in trials:
        lines.append(
            f"{t.localization:>8.3g} {t.nbeta:>9.4g} {t.step_size:>10.3g} "
            f"{t.comparison_step_size:>11.3g} {t.llc:>9.4g} ± {t.llc_mcse:<6.2g} "
            f"{'yes' if t.passed else 'no':>3}  {'; '.join(t.reasons)}" + (" <" if t.chosen else "")
        )
    return lines
