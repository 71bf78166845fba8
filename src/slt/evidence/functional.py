"""L_n(w) of a user's model as a function of its flattened parameters, via ``torch.func``.

The evidence tools need the full-data mean NLL L_n(w) = (1/n) Σ_i ℓ(x_i, w) at parameter
points other than the model's own: at many points at once (quadrature), with its gradient
and Hessian-vector products (BIC, Laplace). :class:`FlatLoss` binds a private copy of the
model (by default in float64, eval mode), its data and ``loss_fn`` into such a function of
one flat vector w, with the trainable parameters in ``named_parameters()`` order;
:func:`module_nll` is its vectorized form for :func:`slt.evidence.quadrature_free_energy`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

from slt.data import BatchStream, batch_size
from slt.losses import LossFn, LossModule
from slt.passes import has_shared_modules, swapped_call


def _cast(batch: Any, dtype: torch.dtype | None) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast(b, dtype) for b in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_cast(b, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch


class FlatLoss:
    """L_n(w) = Σ_b (|b|/n) loss_fn(model_w, b) over the batches of ``loader``, w flat.

    Parameters
    ----------
    model : torch.nn.Module
        Copied (never modified), put in eval mode and, unless ``dtype`` is None, cast to
        ``dtype``. Only trainable parameters are variables; the rest stay fixed.
    loader : a ``DataLoader`` or other re-iterable of batches, read once and kept in
        memory (order does not matter: L_n is the size-weighted mean of batch losses).
    loss_fn : callable ``(model, batch) -> Tensor``, the batch mean per-sample NLL.
    dtype : torch.dtype or None
        float64 by default: n L_n at n = 10⁴ needs more than float32's 7 digits.
    """

    def __init__(self, model, loader: Iterable, loss_fn: LossFn, *, dtype=torch.float64):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        module = copy.deepcopy(model).eval()
        if dtype is not None:
            module = module.to(dtype)
        named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.center = torch.cat([p.detach().reshape(-1) for _, p in named])  # (d,) the model's w
        self.dtype, self.device = self.center.dtype, self.center.device
        self.bound = LossModule(module, loss_fn)
        self.shared = has_shared_modules(self.bound)
        stream = BatchStream(loader, self.device)
        self.batches = [_cast(b, dtype) for b in stream.complete_pass()]
        if not self.batches:
            raise ValueError("loader: yielded no batches (is the dataset empty?)")
        counts = [batch_size(b) for b in self.batches]
        self.n = sum(counts)
        self.weights = [c / self.n for c in counts]

    @property
    def dim(self) -> int:
        return int(self.center.numel())

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(w, self.sizes)
        return {f"model.{k}": p.view(s) for k, p, s in zip(self.names, parts, self.shapes)}

    def batch_loss(self, w: torch.Tensor, batch: Any) -> torch.Tensor:
        return swapped_call(self.bound, self.params(w), (batch,), shared=self.shared).reshape(())

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """L_n(w) for one flat w (d,), differentiable by ``torch.func`` (and ``vmap``-able)."""
        total = 0.0
        for weight, batch in zip(self.weights, self.batches):
            total = total + weight * self.batch_loss(w, batch)
        return total

    def _sum(self, fn) -> torch.Tensor:
        """Σ_b (|b|/n) fn(b), batch by batch (one batch's graph in memory at a time)."""
        total = None
        for weight, batch in zip(self.weights, self.batches):
            part = weight * fn(batch).detach()
            total = part if total is None else total + part
        return total

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        """∇L_n(w)."""
        return self._sum(lambda b: grad(self.batch_loss)(w, b))

    def hvp(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """∇²L_n(w) v by reverse-over-reverse differentiation; v may be (d,) or (k, d)."""

        def one(b, u):
            return grad(lambda x: torch.dot(grad(self.batch_loss)(x, b), u))(w)

        if v.ndim == 1:
            return self._sum(lambda b: one(b, v))
        return self._sum(lambda b: vmap(lambda u: one(b, u))(v))

    def hessian(self, w: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
        """The dense, symmetrized (d, d) Hessian, from Hessian-vector products with basis
        vectors ``chunk_size`` at a time."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        h = torch.cat(
            [self.hvp(w, eye[s : s + chunk_size]) for s in range(0, self.dim, chunk_size)]
        )
        return (h + h.T) / 2


class ModuleNLL:
    """A vectorized L_n: ``nll(w)`` with w (points, d) returns (points,) float64 values.

    Made by :func:`module_nll`. ``dim``, ``names`` and ``center`` (the model's own flat
    parameters) describe the flattening.
    """

    def __init__(self, flat: FlatLoss, chunk_size: int | None):
        self.flat = flat
        self.dim, self.names, self.center = flat.dim, flat.names, flat.center.double()
        work = max(1, flat.n)
        self.chunk_size = chunk_size or max(1, (1 << 21) // work)
        self._batched = vmap(flat.loss)
        self.vectorized = True  # set to False if vmap fails on this model

    def __call__(self, w) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w)
        if w.ndim != 2 or w.shape[1] != self.dim:
            raise ValueError(f"nll: w must have shape (points, {self.dim}), got {tuple(w.shape)}")
        w = w.to(self.flat.dtype).to(self.flat.device)
        out = []
        with torch.no_grad():
            for s in range(0, w.shape[0], self.chunk_size):
                out.append(self._chunk(w[s : s + self.chunk_size]))
        return torch.cat(out).double().cpu() if out else torch.empty(0, dtype=torch.float64)

    def _chunk(self, w: torch.Tensor) -> torch.Tensor:
        if self.vectorized:
            try:
                return self._batched(w)
            except RuntimeError as err:  # e.g. data-dependent control flow in the model
                self.vectorized = False
                warnings.warn(
                    f"module_nll: torch.func.vmap failed ({str(err).splitlines()[0]}); "
                    "evaluating one parameter point at a time (slow)",
                    RuntimeWarning, stacklevel=3,
                )  # fmt: skip
        return torch.stack([self.flat.loss(p) for p in w])

    def __repr__(self) -> str:
        return f"ModuleNLL(dim={self.dim}, n={self.flat.n}, names={self.names})"


def module_nll(
    model: torch.nn.Module,
    data: Any,
    loss_fn: LossFn,
    *,
    dtype: torch.dtype | None = torch.float64,
    chunk_size: int | None = None,
) -> ModuleNLL:
    """The mean per-sample NLL L_n(w) of ``model`` at many parameter points at once.

    L_n(w) = (1/n) Σ_i -log p(y_i | x_i, w), evaluated by ``torch.func.functional_call``
    with the parameters replaced by a row of w and ``torch.func.vmap`` over rows, in chunks
    of ``chunk_size`` points. The row layout is the trainable parameters flattened and
    concatenated in ``model.named_parameters()`` order.

    Parameters
    ----------
    model : torch.nn.Module
        Copied (never modified), eval mode, cast to ``dtype`` (float64 by default; None
        keeps the model's): n L_n must be accurate to well under 1 at n up to 10⁴.
    data : batch or DataLoader
        One batch holding the whole dataset, as ``loss_fn`` takes it (e.g. ``(x, y)``), or
        a ``DataLoader`` whose batches are combined as the size-weighted mean.
    loss_fn : callable ``(model, batch) -> Tensor``
        The batch mean per-sample NLL (:func:`slt.gaussian_nll`, :func:`slt.supervised`).
    chunk_size : int, optional
        Points per vectorized call; default 2²¹ / n (memory grows with points × n).

    Returns
    -------
    ModuleNLL
        ``nll(w)``: w a (points, d) tensor or array → (points,) float64 tensor.

    Examples
    --------
    >>> import torch, slt
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> x = torch.tensor([[1.0], [2.0]]); y = torch.tensor([[1.0], [2.0]])
    >>> nll = module_nll(model, (x, y), slt.gaussian_nll(1.0))
    >>> nll(torch.tensor([[1.0], [0.0]])).numpy().round(4)   # log(2π)/2, then + (1 + 4)/4
    array([0.9189, 2.1689])
    """
    loader = data if isinstance(data, torch.utils.data.DataLoader) else [data]
    return ModuleNLL(FlatLoss(model, loader, loss_fn, dtype=dtype), chunk_size)


def log_normal(w: torch.Tensor, mean: float, std: float) -> float:
    """log N(w; mean, std² I) for a flat w."""
    z = (w - mean) / std
    return float(-0.5 * z.square().sum() - w.numel() * math.log(std * math.sqrt(2 * math.pi)))
