"""Eigenvalues of the Hessian of L_n at a point: dense for small d, Lanczos for large d.

Dense (d ≤ ``dense_max``): the full Hessian from d Hessian-vector products, then
``numpy.linalg.eigvalsh`` — every eigenvalue, to rounding. Above that, the ``num_eigs``
largest by implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``, ARPACK; Lehoucq,
Sorensen & Yang 1998) on Hessian-vector products; the rest are not computed, and
:class:`Spectrum` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from slt.evidence.functional import FlatLoss


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
    d = flat.dim
    if d <= dense_max:
        h = flat.hessian(w)
        return Spectrum(np.linalg.eigvalsh(h.double().cpu().numpy()), d, "dense"), h
    k = min(num_eigs, d - 1)

    def matvec(v: np.ndarray) -> np.ndarray:
        u = torch.as_tensor(
            np.ascontiguousarray(v).reshape(-1), dtype=flat.dtype, device=flat.device
        )
        return flat.hvp(w, u).double().cpu().numpy()

    op = LinearOperator((d, d), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(d)
    values = eigsh(op, k=k, which="LA", v0=v0, return_eigenvectors=False)
    return Spectrum(np.sort(values), d, "eigsh"), None
