"""Adaptive tensor-product Gauss–Kronrod cubature of exp(-E(w)) over a box, 1 ≤ d ≤ 3.

Each cell carries the tensor product of the 15-point Kronrod rule in every dimension and,
embedded in it, the 7-point Gauss rule (Piessens, de Doncker-Kapenga, Überhuber & Kahaner
1983, QUADPACK's ``qk15``). A cell's error estimate is |K - G|, the difference between the
two tensor rules; the cell is bisected across the dimension where swapping that one factor
from Kronrod to Gauss changes the value most, so ridges (the minimizer sets of singular
models) are refined across, not along. Cells are refined, largest error first, until the
summed estimate is below the tolerance. Cells containing a given point can first be
bisected toward it down to a given width (a graded mesh at a sharp minimum).

Two integrals come out of the same evaluations: I = ∫ exp(-(E - E0)) and
J = ∫ u exp(-(E - E0)), where ``energy`` returns (E, u) and E0 is a running minimum of E
(the log-sum-exp shift; past cells are rescaled when it moves).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# QUADPACK qk15: Kronrod abscissae (positive half, 0 last), their weights, and the weights
# of the 7-point Gauss rule on the odd-indexed abscissae.
_XGK = (0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
        0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
        0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
        0.207784955007898467600689403773245, 0.0)  # fmt: skip
_WGK = (0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
        0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
        0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
        0.204432940075298892414161999234649, 0.209482141084727828012999174891714)  # fmt: skip
_WG = (0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
       0.381830050505118944950369775488975, 0.417959183673469387755102040816327)  # fmt: skip


# The 7-point Kronrod extension of the 3-point Gauss rule (Kronrod 1965; as tabulated in
# Boost.Math's gauss_kronrod<double, 7>): abscissae (0 last) and weights.
_XGK7 = (0.960491268708020283423507092629080, 0.774596669241483377035853079956480,
         0.434243749346802558002071502844628, 0.0)  # fmt: skip
_WGK7 = (0.104656226026467265193823857192073, 0.268488089868333440728569280666710,
         0.401397414775962222905051818618432, 0.450916538658474142345110087045571)  # fmt: skip
_WG3 = (0.555555555555555555555555555555556, 0.888888888888888888888888888888889)


def _rule(xgk, wgk, wg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m,) nodes on [-1, 1] and their Kronrod and Gauss (0 off the Gauss nodes) weights,
    from the positive half (0 last) of a Gauss–Kronrod pair; Gauss nodes are every other."""
    half = len(xgk)
    gauss = [(wg[i // 2] if i % 2 == (half - 1) % 2 else 0.0) for i in range(half)]
    order = [*range(half), *reversed(range(half - 1))]  # -x0.., 0, ..x0
    sign = [-1.0] * (half - 1) + [1.0] * half
    nodes = np.array([s * xgk[i] for s, i in zip(sign, order)])
    return nodes, np.array([wgk[i] for i in order]), np.array([gauss[i] for i in order])


RULES = {"gk15": _rule(_XGK, _WGK, _WG), "gk7": _rule(_XGK7, _WGK7, _WG3)}
Energy = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # (P, d) -> (E, u), (P,) each


def _contract(values: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Σ over the node axes of values (C, m, ..., m) times the outer product of weights."""
    for w in reversed(weights):
        values = values @ w
    return values


@dataclass
class Cubature:
    """The state of the refinement: cells ``(C, d)`` and their integrals, scaled by exp(E0)."""

    energy: Energy
    dim: int
    rule: str = "gk15"
    chunk: int = 1 << 18  # points per call of ``energy``
    e0: float = math.inf  # the shift: exp(-(E - e0)) is integrated
    evals: int = 0

    def __post_init__(self):
        d = self.dim
        self.nodes, self.w_kronrod, self.w_gauss = RULES[self.rule]
        grids = np.meshgrid(*[self.nodes] * d, indexing="ij")
        self.grid = np.stack(grids, -1).reshape(-1, d)  # (15^d, d)
        self.lo = np.empty((0, d))
        self.hi = np.empty((0, d))
        self.ik = np.empty(0)  # Kronrod value of I per cell
        self.jk = np.empty(0)  # Kronrod value of J per cell
        self.err_i = np.empty((0, d + 1))  # |K - G| with Gauss in dim j (col j), in all (col d)
        self.err_j = np.empty((0, d + 1))
        self.e_min = math.inf

    def _energy(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = [self.energy(points[s : s + self.chunk]) for s in range(0, len(points), self.chunk)]
        self.evals += len(points)
        e = np.concatenate([o[0] for o in out])
        u = np.concatenate([o[1] for o in out])
        return e, u

    def evaluate(self, lo: np.ndarray, hi: np.ndarray):
        """(I_K, err_I, J_K, err_J, E0) of the cells [lo, hi] (C, d), in units of exp(-E0)."""
        d = self.dim
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        points = mid[:, None, :] + half[:, None, :] * self.grid[None]  # (C, 15^d, d)
        e, u = self._energy(points.reshape(-1, d))
        finite = e[np.isfinite(e)]
        if finite.size and finite.min() < self.e0 - 1.0:
            self.rescale(float(finite.min()))
        self.e_min = min(self.e_min, float(finite.min()) if finite.size else math.inf)
        g = np.exp(-(e - self.e0)).reshape(len(lo), *[len(self.nodes)] * d)
        ug = np.where(g > 0, u.reshape(g.shape) * g, 0.0)
        vol = np.prod(half, axis=1)
        out = []
        for values in (g, ug):
            wk, wg = self.w_kronrod, self.w_gauss
            k = _contract(values, [wk] * d)
            errs = [_contract(values, [wg if i == j else wk for i in range(d)]) for j in range(d)]
            errs.append(_contract(values, [wg] * d))
            err = np.abs(k[:, None] - np.stack(errs, 1)) * vol[:, None]
            out += [k * vol, err]
        return (*out, self.e0)

    def rescale(self, e0: float) -> None:
        """Move the shift to ``e0`` (< the current one), rescaling the stored integrals."""
        factor = math.exp(e0 - self.e0) if math.isfinite(self.e0) else 0.0
        self.ik, self.jk = self.ik * factor, self.jk * factor
        self.err_i, self.err_j = self.err_i * factor, self.err_j * factor
        self.e0 = e0

    def add(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Evaluate the cells [lo, hi] (C, d) and append them."""
        step = max(1, self.chunk // len(self.grid))
        parts = [self.evaluate(lo[s : s + step], hi[s : s + step]) for s in range(0, len(lo), step)]
        # a later part may have moved the shift: bring every part to the final one
        parts = [[v * math.exp(self.e0 - p[4]) for v in p[:4]] for p in parts]
        self.lo, self.hi = np.vstack([self.lo, lo]), np.vstack([self.hi, hi])
        self.ik = np.concatenate([self.ik, *[p[0] for p in parts]])
        self.err_i = np.vstack([self.err_i, *[p[1] for p in parts]])
        self.jk = np.concatenate([self.jk, *[p[2] for p in parts]])
        self.err_j = np.vstack([self.err_j, *[p[3] for p in parts]])

    def totals(self) -> tuple[float, float, float, float]:
        """(I, J, error bound of I, of J), all in units of exp(-E0)."""
        return (math.fsum(self.ik), math.fsum(self.jk),
                float(self.err_i[:, -1].sum()), float(self.err_j[:, -1].sum()))  # fmt: skip

    def refine(self, *, rtol: float, max_evals: int) -> bool:
        """Bisect the worst cells until Σ err_I/I + Σ err_J/|J| ≤ rtol; True if reached."""
        per_cell = len(self.grid)
        while True:
            i, j, _, _ = self.totals()
            if i <= 0:
                return False
            score = self.err_i / i + (self.err_j / abs(j) if j != 0 else 0.0)  # (C, d + 1)
            total = score[:, -1]
            if total.sum() <= rtol:
                return True
            budget = (max_evals - self.evals) // (2 * per_cell)
            if budget < 1:
                return False
            order = np.argsort(total)[::-1]
            take = int(np.searchsorted(np.cumsum(total[order]), 0.5 * total.sum())) + 1
            chosen = order[: min(take, budget, max(1, self.chunk // per_cell))]
            self.split(chosen, np.argmax(score[chosen, :-1], axis=1))

    def split(self, cells: np.ndarray, dims: np.ndarray) -> None:
        """Bisect ``cells`` across ``dims`` (one dimension per cell) and evaluate the halves."""
        lo, hi = self.lo[cells], self.hi[cells]
        rows = np.arange(len(cells))
        mid = (lo[rows, dims] + hi[rows, dims]) / 2
        hi1, lo2 = hi.copy(), lo.copy()
        hi1[rows, dims] = mid
        lo2[rows, dims] = mid
        keep = np.ones(len(self.lo), dtype=bool)
        keep[cells] = False
        self.lo, self.hi = self.lo[keep], self.hi[keep]
        self.ik, self.jk = self.ik[keep], self.jk[keep]
        self.err_i, self.err_j = self.err_i[keep], self.err_j[keep]
        self.add(np.vstack([lo, lo2]), np.vstack([hi1, hi]))


def graded_cells(
    breaks: list[np.ndarray],
    points: np.ndarray,
    scales: np.ndarray,
    *,
    sharp: np.ndarray,
    width: float = 8.0,
    reach: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The tensor mesh of ``breaks`` (one sorted array per dimension), with every cell that
    meets the box ``points[p] ± reach × scales[p]`` bisected until its width in each
    dimension j where ``scales[p, j] < sharp[j]`` is at most ``width`` × ``scales[p, j]``: a
    mesh graded toward each point across its sharp directions, on both sides of it even when
    it sits (up to rounding) on a face. Returns (lo, hi), each (C, d).

    >>> lo, hi = graded_cells([np.array([0.0, 1.0])], np.zeros((1, 1)), np.full((1, 1), 1 / 64),
    ...                       sharp=np.ones(1))
    >>> sorted(lo.ravel().tolist())   # widths 1/8, 1/8, 1/4, 1/2 toward the point at 0
    [0.0, 0.125, 0.25, 0.5]
    """
    dim = len(breaks)
    lo = np.stack(np.meshgrid(*[b[:-1] for b in breaks], indexing="ij"), -1).reshape(-1, dim)
    hi = np.stack(np.meshgrid(*[b[1:] for b in breaks], indexing="ij"), -1).reshape(-1, dim)
    low, high = points - reach * scales, points + reach * scales  # (P, d)
    meets = np.all([(high[:, j] >= b[0]) & (low[:, j] <= b[-1]) for j, b in enumerate(breaks)], 0)
    meets &= np.any(scales < sharp, 1)
    need = np.where(scales < sharp, width * scales, np.inf)[meets]
    low, high = low[meets], high[meets]
    # (cell, point) pairs for every initial cell that meets a point's box
    shape = [len(b) - 1 for b in breaks]
    first = [np.clip(np.searchsorted(b, low[:, j], "right") - 1, 0, shape[j] - 1)
             for j, b in enumerate(breaks)]  # fmt: skip
    last = [np.clip(np.searchsorted(b, high[:, j], "left") - 1, 0, shape[j] - 1)
            for j, b in enumerate(breaks)]  # fmt: skip
    cell, point = [], []
    for p in range(len(low)):
        idx = np.meshgrid(*[np.arange(first[j][p], last[j][p] + 1) for j in range(dim)],
                          indexing="ij")  # fmt: skip
        flat = np.ravel_multi_index([i.ravel() for i in idx], shape)
        cell.append(flat)
        point.append(np.full(len(flat), p))
    pairs = np.stack([np.concatenate(cell or [[]]), np.concatenate(point or [[]])], 1)
    pairs = pairs.astype(int)
    while len(pairs):
        c, p = pairs[:, 0], pairs[:, 1]
        required = np.full(lo.shape, np.inf)
        np.minimum.at(required, c, need[p])
        ratio = (hi - lo) / required
        split = np.flatnonzero(ratio.max(1) > 1)
        if split.size == 0:
            break
        dims = ratio[split].argmax(1)
        rows = np.arange(len(split))
        mid = (lo[split, dims] + hi[split, dims]) / 2
        child = np.full(len(lo), -1)
        child[split] = len(lo) + rows  # the upper half becomes a new cell
        cut_dim = np.full(len(lo), -1)
        cut_dim[split] = dims
        cut = np.full(len(lo), np.nan)
        cut[split] = mid
        new_lo, new_hi = lo[split].copy(), hi[split].copy()
        new_lo[rows, dims] = mid
        hi[split, dims] = mid
        lo, hi = np.vstack([lo, new_lo]), np.vstack([hi, new_hi])
        # the pairs of split cells go to the halves their point's box meets
        moved = child[c] >= 0
        mc, mp = c[moved], p[moved]
        lower = pairs[moved][low[mp, cut_dim[mc]] <= cut[mc]]
        upper = pairs[moved][high[mp, cut_dim[mc]] >= cut[mc]].copy()
        upper[:, 0] = child[upper[:, 0]]
        pairs = np.vstack([pairs[~moved], lower, upper])
    return lo, hi
