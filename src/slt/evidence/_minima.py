"""Where exp(-E) is concentrated: minimizers of E and samples of its minimizer set.

Before integrating, :func:`find_features` locates what the mesh must resolve:

- the global minimum E0 and local minimizers (a grid, then L-BFGS-B from its lowest
  points), which become break points of the mesh;
- the minimum of E along every grid line (each coordinate direction), polished by golden
  section. On a singular model these sample the minimizer set (the axes of a²b², the
  planes of a²b²c²) wherever the density is not negligible (E - E0 ≤ a cutoff);
- at each such point and each dimension, the width over which E rises by 1 — the scale
  the mesh must reach there.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize

GRID = {1: 2001, 2: 201, 3: 41}  # grid points per dimension
MAX_POINTS = 20_000
_GOLDEN = (math.sqrt(5) - 1) / 2


def _line_minima(e: np.ndarray, axes: list[np.ndarray], e0: float, cutoff: float):
    """Grid points that are minima of E along some grid line: (points (P, d), dims (P,),
    bracket (P, 2)) with the neighbours along that line as the bracket."""
    dim = e.ndim
    pts, dims, brackets = [], [], []
    for j in range(dim):
        ej = np.moveaxis(e, j, -1)
        left = np.concatenate([np.full(ej.shape[:-1] + (1,), np.inf), ej[..., :-1]], -1)
        right = np.concatenate([ej[..., 1:], np.full(ej.shape[:-1] + (1,), np.inf)], -1)
        is_min = (ej <= left) & (ej <= right) & (ej - e0 <= cutoff)
        idx = np.argwhere(np.moveaxis(is_min, -1, j))  # (P, d) grid indices
        if idx.size == 0:
            continue
        p = np.stack([axes[i][idx[:, i]] for i in range(dim)], 1)
        k = idx[:, j]
        a = axes[j][np.maximum(k - 1, 0)]
        b = axes[j][np.minimum(k + 1, len(axes[j]) - 1)]
        pts.append(p)
        dims.append(np.full(len(p), j))
        brackets.append(np.stack([a, b], 1))
    if not pts:
        return np.empty((0, dim)), np.empty(0, dtype=int), np.empty((0, 2))
    return np.vstack(pts), np.concatenate(dims), np.vstack(brackets)


def _golden(energy, points: np.ndarray, dims: np.ndarray, bracket: np.ndarray, iters: int = 45):
    """Minimize E along dimension ``dims[p]`` within ``bracket[p]``, all points at once."""
    a, b = bracket[:, 0].copy(), bracket[:, 1].copy()
    rows = np.arange(len(points))

    def at(x):
        q = points.copy()
        q[rows, dims] = x
        return energy(q)[0]

    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = at(c), at(d)
    for _ in range(iters):
        left = fc <= fd  # the minimum is in [a, d]
        a, b = np.where(left, a, c), np.where(left, d, b)
        c_new, d_new = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        f_new = at(np.where(left, c_new, d_new))
        fc, fd = np.where(left, f_new, fd), np.where(left, fc, f_new)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
    out = points.copy()
    out[rows, dims] = np.where(fc <= fd, c, d)
    return out


def widths(energy, points: np.ndarray, std: np.ndarray, levels: int = 48) -> np.ndarray:
    """(P, d): per point and dimension, the largest σ·2^-k (k < ``levels``) over which E
    rises by at most 1 on both sides, by bisection on k (the rise grows with the step).

    >>> import numpy as np
    >>> def energy(w):   # E = 100 w_0² + w_1²/2: widths 2^-4 (1/√100 ≈ 0.1) and 1
    ...     e = 100 * w[:, 0] ** 2 + 0.5 * w[:, 1] ** 2
    ...     return e, e
    >>> widths(energy, np.zeros((1, 2)), np.ones(2)).tolist()
    [[0.0625, 1.0]]
    """
    num, dim = points.shape
    e_p = energy(points)[0]
    lo = np.zeros((num, dim), dtype=int)
    hi = np.full((num, dim), levels - 1)
    rows, cols = np.indices((num, dim))
    while np.any(lo < hi):
        active = lo < hi
        p, j = rows[active], cols[active]
        mid = (lo[active] + hi[active]) // 2
        h = std[j] * 2.0**-mid
        probe = np.repeat(points[p], 2, 0)
        probe[np.arange(len(p) * 2), np.repeat(j, 2)] += np.stack([h, -h], 1).ravel()
        rise = energy(probe)[0].reshape(-1, 2).max(1) - e_p[p]
        ok = rise <= 1.0
        hi[p[ok], j[ok]] = mid[ok]
        lo[p[~ok], j[~ok]] = mid[~ok] + 1
    return std[None, :] * 2.0**-lo


def find_features(energy, box: np.ndarray, mean: np.ndarray, std: np.ndarray, *, cutoff: float):
    """(E0, minimizers (k, d), points (P, d) to resolve, their widths (P, d)).

    Line minima with E - E0 > ``cutoff`` are left out: their density is below e^-cutoff
    of the peak's."""
    dim = len(mean)
    axes = [np.union1d(np.linspace(lo, hi, GRID[dim]), [m]) for (lo, hi), m in zip(box, mean)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, dim)
    e = energy(grid)[0]
    if not np.isfinite(e).any():
        raise ValueError("nll is not finite anywhere on the grid over the integration box")
    e0 = float(e.min())
    found = []
    for start in grid[np.argsort(e)[: 4 * dim]]:
        res = optimize.minimize(lambda w: float(energy(w[None])[0][0]), start,
                                method="L-BFGS-B", bounds=box)  # fmt: skip
        best = res.x if np.isfinite(res.fun) and res.fun <= energy(start[None])[0][0] else start
        if not any(np.allclose(best, f, rtol=0, atol=1e-6 * np.ptp(box)) for f in found):
            found.append(best)
    minimizers = np.array(found)
    e_min = energy(minimizers)[0]
    minimizers = minimizers[np.argsort(e_min)]
    e0 = min(e0, float(e_min.min()))
    pts, dims, bracket = _line_minima(e.reshape([len(a) for a in axes]), axes, e0, cutoff)
    if len(pts) > MAX_POINTS:
        keep = np.argsort(energy(pts)[0])[:MAX_POINTS]
        pts, dims, bracket = pts[keep], dims[keep], bracket[keep]
    if len(pts):
        pts = _golden(energy, pts, dims, bracket)
        e_pts = energy(pts)[0]
        e0 = min(e0, float(np.nanmin(e_pts)))
    points = np.vstack([minimizers, pts])
    return e0, minimizers, points, widths(energy, points, std)
