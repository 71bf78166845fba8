"""Which solution the posterior prefers at each sample size: a free-energy phase diagram.

The Bayes free energy of the neighbourhood of a solution w_i is, to leading orders
(Watanabe 2009, main formula II; Chen et al. 2023, arXiv 2310.06301, section 4),

    F_i(n) ≈ n L(w_i) + λ_i log n - (m_i - 1) log log n,

with L the per-sample loss (population, or a large held-out sample) and λ_i, m_i the
local learning coefficient and multiplicity at w_i. The posterior concentrates on the
solution of smallest F_i(n): at small n a simple solution (small λ) can win despite a
higher loss; as n grows the loss term takes over. A Bayesian phase transition is a
sample size where the minimizer changes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from slt._text import right


@dataclass(frozen=True)
class Candidate:
    """A solution w_i: its per-sample loss L(w_i), λ̂_i (± se) and multiplicity m_i."""

    name: str
    loss: float
    llc: float
    m: float = 1.0
    llc_std: float = 0.0

    def free_energy(self, n) -> np.ndarray:
        """n L + λ log n - (m - 1) log log n at each n."""
        n = np.asarray(n, dtype=np.float64)
        return n * self.loss + self.llc * np.log(n) - (self.m - 1) * np.log(np.log(n))


@dataclass(frozen=True)
class Crossing:
    """The sample size where the posterior's preference moves from one solution to another."""

    n: float  # F_before(n) = F_after(n)
    before: str  # dominant just below n
    after: str  # dominant just above n
    n_low: float  # the crossing with λ_after - λ_before lowered by 2 se (NaN: gone, see below)
    n_high: float  # ... raised by 2 se (NaN: gone)

    def range_text(self) -> str:
        """The ± 2 se range in words; "none" for an end where 2 se remove the crossing."""
        if self.n_low == self.n_high == self.n:
            return "no range: llc_std is 0"
        low = "none" if math.isnan(self.n_low) else f"{self.n_low:.3g}"
        high = "none" if math.isnan(self.n_high) else f"{self.n_high:.3g}"
        return f"λ̂ ± 2 se: {low} to {high}"


@dataclass(frozen=True)
class PhaseDiagram:
    """F_i(n) for each candidate over a grid of n. Arrays are ``(candidate, n)`` or ``(n,)``."""

    candidates: tuple[Candidate, ...]
    n: np.ndarray  # (n,)
    free_energy: np.ndarray  # (candidate, n)
    dominant: np.ndarray  # (n,) index of the candidate of least F
    crossings: tuple[Crossing, ...]  # where ``dominant`` changes, in order of n
    warnings: tuple[str, ...] = ()  # e.g. a negative λ̂: w_i was not a local minimum

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    def crossing(self, a: str, b: str) -> float:
        """n where F_a(n) = F_b(n) within the grid's range; NaN if they do not cross there."""
        ca, cb = (self.candidates[self.names.index(x)] for x in (a, b))
        return _crossing(ca, cb, self.n[0], self.n[-1])

    def to_dict(self) -> dict:
        return {
            "candidates": [c.__dict__ for c in self.candidates],
            "n": self.n.tolist(),
            "free_energy": self.free_energy.tolist(),
            "dominant": [self.names[i] for i in self.dominant],
            "crossings": [c.__dict__ for c in self.crossings],
            "warnings": list(self.warnings),
        }

    def plot(self, ax=None):
        """:func:`slt.plots_development.plot_phase_diagram` of this diagram."""
        from slt.plots_development import plot_phase_diagram

        return plot_phase_diagram(self, ax=ax)

    def __str__(self) -> str:
        lines = [
            "Free energy F(n) ≈ n L + λ log n - (m - 1) log log n",
            f"{'candidate':>12} {'L':>10} {right('λ̂', 8)} {'± se':>6} {'m':>4}",
        ]
        for c in self.candidates:
            lines.append(f"{c.name:>12} {c.loss:>10.5g} {c.llc:>8.4g} {c.llc_std:>6.2g} {c.m:>4g}")
        n0, n1 = self.n[0], self.n[-1]
        lines.append(f"dominant for n in [{n0:.3g}, {n1:.3g}]:")
        edges = [n0, *(c.n for c in self.crossings), n1]
        winners = [self.names[self.dominant[0]], *(c.after for c in self.crossings)]
        for (a, b), name in zip(zip(edges[:-1], edges[1:]), winners):
            lines.append(f"  {a:>10.4g} - {b:<10.4g} {name}")
        for c in self.crossings:
            lines.append(f"  crossing {c.before} -> {c.after} at n = {c.n:.4g} ({c.range_text()})")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def phase_diagram(candidates, n) -> PhaseDiagram:
    """F_i(n) ≈ n L_i + λ̂_i log n - (m_i - 1) log log n, the dominant solution, crossings.

    Parameters
    ----------
    candidates : mapping name -> {"loss", "llc", optional "m", "llc_std"}, or a sequence
        of :class:`Candidate` (or of such dicts with a ``"name"``). ``loss`` is the
        per-sample NLL L(w_i) (population or held out: constants common to all cancel),
        ``llc`` is λ̂_i, ``m`` the multiplicity where known (default 1), ``llc_std`` the
        standard error of λ̂_i, used for the crossings' ranges.
    n : array of sample sizes, all > e (so that log log n is defined), ascending

    Returns
    -------
    PhaseDiagram

    Examples
    --------
    >>> d = phase_diagram({"simple": {"loss": 0.10, "llc": 1.0},
    ...                    "complex": {"loss": 0.09, "llc": 3.0}}, np.geomspace(10, 1e4, 50))
    >>> [(c.before, c.after, round(c.n)) for c in d.crossings]  # 0.01 n = 2 log n
    [('simple', 'complex', 1457)]
    """
    cands = _candidates(candidates)
    given = n
    try:
        n = np.atleast_1d(np.asarray(n, dtype=np.float64))
    except (TypeError, ValueError):
        n = np.array([math.nan])
    if (n.ndim != 1 or n.size < 1 or not np.all(np.isfinite(n)) or not np.all(n > math.e)
            or np.any(np.diff(n) <= 0)):  # fmt: skip
        raise ValueError(
            "n must be an ascending array of finite sample sizes > e (log log n > 0), "
            f"got {given!r}"
        )
    free = np.stack([c.free_energy(n) for c in cands])
    dominant = np.argmin(free, axis=0)
    crossings = []
    for at, i, j in _envelope(cands, n[0], n[-1]):
        a, b = cands[i], cands[j]
        se = 2 * math.hypot(a.llc_std, b.llc_std)
        # F_a - F_b rises through 0 at ``at``; lowering λ_b by se moves this root down until
        # it meets the pair's previous root (the two then vanish), raising it moves it up
        # toward the next one: each end is searched between ``at`` and that neighbour
        roots = _roots(a, b, LOWEST_N, n[-1] * SEARCH_ABOVE)
        below = max((r for r in roots if r < at * (1 - 1e-9)), default=LOWEST_N)
        above = min((r for r in roots if r > at * (1 + 1e-9)), default=n[-1] * SEARCH_ABOVE)
        low = _last_root(a, _shift(b, -se), below, at) if se else at
        high = _crossing(a, _shift(b, se), at, above) if se else at
        crossings.append(Crossing(at, a.name, b.name, low, high))
    notes = tuple(_negative(c) for c in cands if c.llc < 0)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return PhaseDiagram(tuple(cands), n, free, dominant, tuple(crossings), notes)


def _negative(c: Candidate) -> str:
    """λ ≥ 0 at a local minimum: a negative λ̂ gives its candidate too low an F(n)."""
    se = f" ± {c.llc_std:.2g}" if c.llc_std else ""
    return (
        f"candidate {c.name!r}: λ̂ = {c.llc:.4g}{se} is negative, but λ ≥ 0 at a local "
        "minimum; its w_i was not one (the chains found lower loss) or the sampler was "
        "mis-tuned, so its F(n) is too low and the diagram favours it (see slt.diagnose)"
    )


LOWEST_N = math.e * (1 + 1e-9)
"""The smallest n searched for a crossing's range (log log n must be defined)."""

SEARCH_ABOVE = 1e6
"""A crossing's range is searched up to this many times the largest n of the grid."""


def _envelope(cands: list[Candidate], lo: float, hi: float) -> list[tuple[float, int, int]]:
    """Where the candidate of least F changes over [lo, hi]: (n, before, after), ascending.
    Every change is a root of some pair's F_a - F_b, so the roots of all pairs cut [lo, hi]
    into pieces with one winner each (a winner between two points of the caller's grid was
    missed when crossings were looked for only where the grid's winner changed)."""
    cuts = sorted({r for i in range(len(cands)) for j in range(i + 1, len(cands))
                   for r in _roots(cands[i], cands[j], lo, hi) if lo < r < hi})  # fmt: skip
    edges = [lo, *cuts, hi]
    winners = []
    for start, end in zip(edges[:-1], edges[1:]):
        mid = math.sqrt(start * end)
        winners.append(int(np.argmin([float(c.free_energy(mid)) for c in cands])))
    return [(cut, a, b) for cut, a, b in zip(cuts, winners[:-1], winners[1:]) if a != b]


def _shift(c: Candidate, delta: float) -> Candidate:
    return Candidate(c.name, c.loss, c.llc + delta, c.m, c.llc_std)


def _crossing(a: Candidate, b: Candidate, lo: float, hi: float) -> float:
    """Root of F_a - F_b in log n over [lo, hi] (the first sign change on a grid); NaN if none."""
    roots = _roots(a, b, lo, hi, first=True)
    return roots[0] if roots else math.nan


def _last_root(a: Candidate, b: Candidate, lo: float, hi: float) -> float:
    """The largest root of F_a - F_b over [lo, hi]; NaN if none."""
    roots = _roots(a, b, lo, hi)
    return roots[-1] if roots else math.nan


def _roots(a: Candidate, b: Candidate, lo: float, hi: float, first: bool = False) -> list:
    """Roots of F_a - F_b in log n over [lo, hi], ascending: sign changes on a grid of 200
    points, each refined by Brent's method (only the first if ``first``)."""
    grid = np.geomspace(lo, hi, 200)
    diff = a.free_energy(grid) - b.free_energy(grid)
    if diff[0] == 0:
        return [float(grid[0])]

    def f(log_n):
        return float(a.free_energy(math.exp(log_n)) - b.free_energy(math.exp(log_n)))

    out = []
    for i in np.flatnonzero(np.sign(diff[1:]) != np.sign(diff[:-1])):
        out.append(math.exp(brentq(f, math.log(grid[i]), math.log(grid[i + 1]), xtol=1e-12)))
        if first:
            break
    return out


def _candidates(candidates) -> list[Candidate]:
    if isinstance(candidates, Mapping):
        items = [_make(name, spec) for name, spec in candidates.items()]
    elif isinstance(candidates, Sequence) and not isinstance(candidates, (str, bytes)):
        items = []
        for i, c in enumerate(candidates):
            if isinstance(c, Candidate):
                items.append(c)
            elif isinstance(c, Mapping) and "name" in c:
                items.append(_make(c["name"], c))
            else:
                raise TypeError(
                    f"candidates[{i}] must be a Candidate or a mapping with 'name', 'loss' "
                    f"and 'llc', got {c!r}"
                )
    else:
        raise TypeError(
            "candidates must be a mapping name -> {'loss', 'llc', ...} or a sequence of "
            f"Candidate, got {type(candidates).__name__} {candidates!r}"
        )
    if not items:
        raise ValueError("candidates is empty")
    names = [c.name for c in items]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ValueError(f"candidate names must be distinct; {twice} occur more than once")
    for c in items:
        for field in ("loss", "llc", "m", "llc_std"):
            if not math.isfinite(getattr(c, field)):
                raise ValueError(
                    f"candidate {c.name!r}: {field} must be finite, got {getattr(c, field)!r}"
                )
        if c.m < 1 or c.llc_std < 0:  # F_n = nL_n + λ log n - (m - 1) log log n
            raise ValueError(
                f"candidate {c.name!r}: m must be >= 1 and llc_std >= 0, got m = {c.m!r}, "
                f"llc_std = {c.llc_std!r}"
            )
    return items


def _make(name, spec) -> Candidate:
    if isinstance(spec, Candidate):
        return spec
    if not isinstance(spec, Mapping) or "loss" not in spec or "llc" not in spec:
        raise ValueError(f"candidate {name!r} needs 'loss' and 'llc', got {spec!r}")
    values = {}
    for field, default in (("loss", None), ("llc", None), ("m", 1.0), ("llc_std", 0.0)):
        value = spec.get(field, default)
        try:
            values[field] = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"candidate {name!r}: {field} must be a real number, got {value!r}"
            ) from None
    return Candidate(str(name), **values)
