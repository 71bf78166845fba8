"""Eigenvalues of the Hessian of L_n at a point: dense for small d, Lanczos for large d.

Dense (d ≤ ``dense_max``, or ``num_eigs`` ≥ d): the full Hessian from d Hessian-vector
products, then ``numpy.linalg.eigvalsh`` — every eigenvalue, to rounding. Otherwise the
``num_eigs`` largest by implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``,
ARPACK; Lehoucq, Sorensen & Yang 1998) on Hessian-vector products; the rest are not
computed, and :class:`Spectrum` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from slt import _checks
from slt.evidence.functional import FlatLoss

# Eigenvalues with |λ| ≤ 1e-6 × max(|λ|_max, 1) count as zero. Measured on the zoo at its
# exact minimizers (data stored in float32, Hessian computed in float64): the directions that
# are flat by symmetry come out at 1e-10 to 1e-8 × λ_max, of either sign (the data's float32
# rounding leaves a residual of that size in L_n), the curved ones at ≥ 0.1 × λ_max (deep
# linear 6-5-4-6 and 20-15-10-12, reduced rank 5-4-3-2; λ_max ≈ 1-4). The threshold sits two
# decades above the first group. The floor (1e-6 in absolute terms) is for a Hessian that is
# zero altogether: a²b² at the origin, where the same rounding gives eigenvalues ±1e-8.
RELATIVE_THRESHOLD = 1e-6
ABSOLUTE_THRESHOLD = 1e-6


def zero_threshold(eigenvalues: np.ndarray) -> float:
    """The default threshold below which |λ| counts as zero: 1e-6 × max(|λ|_max, 1).

    >>> zero_threshold(np.array([-1e-9, 0.0, 3.0]))
    3e-06
    """
    top = float(np.abs(eigenvalues).max()) if eigenvalues.size else 0.0
    return max(RELATIVE_THRESHOLD * top, ABSOLUTE_THRESHOLD)


@dataclass(frozen=True)
class Spectrum:
    """Hessian eigenvalues, ascending. ``complete`` is False when only the top ones are known."""

    eigenvalues: np.ndarray  # (k,) ascending; k = d when complete
    dim: int
    method: str  # "dense" or "eigsh"

    @property
    def complete(self) -> bool:
        return len(self.eigenvalues) == self.dim


def hessian_spectrum(
    flat: FlatLoss,
    w: torch.Tensor,
    *,
    dense_max: int = 2000,
    num_eigs: int = 200,
    seed: int = 0,
) -> tuple[Spectrum, torch.Tensor | None]:
    """The spectrum of ∇²L_n(w), and the dense Hessian when it was formed (else None).

    Dense when d ≤ ``dense_max`` (an integer ≥ 0) or ``num_eigs`` ≥ d (every eigenvalue is
    asked for, more than Lanczos finds); else the ``num_eigs`` (≥ 1) largest by ``eigsh``.

    Examples
    --------
    >>> import torch, slt
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); y = torch.zeros(2, 1)
    >>> flat = FlatLoss(model, [(x, y)], slt.gaussian_nll(1.0))
    >>> spec, _ = hessian_spectrum(flat, flat.center)
    >>> spec.eigenvalues.round(6).tolist()   # XᵀX / n
    [0.5, 2.0]
    """
    dense_max = _checks.integer("dense_max", dense_max, minimum=0)
    k = _checks.integer("num_eigs", num_eigs, minimum=1)
    d = flat.dim
    if d <= dense_max or k >= d:  # eigsh finds at most d - 1 eigenvalues
        h = flat.hessian(w)
        return Spectrum(np.linalg.eigvalsh(h.double().cpu().numpy()), d, "dense"), h

    def matvec(v: np.ndarray) -> np.ndarray:
        u = torch.as_tensor(
            np.ascontiguousarray(v).reshape(-1), dtype=flat.dtype, device=flat.device
        )
        return flat.hvp(w, u).double().cpu().numpy()

    op = LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(d)
    values = eigsh(op, k=k, which="LA", v0=v0, return_eigenvectors=False)
    return Spectrum(np.sort(values), d, "eigsh"), None
