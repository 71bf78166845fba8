"""Adapters that turn common criteria into ``loss_fn(model, batch) -> Tensor``.

Every estimator in slt takes the *mean per-sample negative log-likelihood* of a batch.
A loss that is c times the NLL behaves like the temperature c·nβ, so a plain
``F.mse_loss`` is not an NLL: use :func:`gaussian_nll` for regression.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

from slt import _checks
from slt.attention import plain_attention

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


class LossModule(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: lets ``torch.func.functional_call`` swap
    the model's parameters under any ``loss_fn``.

    Unless ``attention`` is False (a model known to have none), the call runs with
    PyTorch's attention set up for ``torch.func`` (:func:`slt.attention.plain_attention`):
    without it an eval-mode ``nn.MultiheadAttention`` takes a fused kernel that vmap cannot
    run, and short sequences hit PyTorch's slow CPU softmax. (Setting it up costs ~10 µs a
    call, ~10% of an untraced vmapped step of a 10-parameter regression.)
    ``math_backend=False`` keeps PyTorch's own kernel for longer sequences, as the
    unbatched eager pass does."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, *, attention: bool = True,
                 math_backend: bool = True):  # fmt: skip
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.attention = attention
        self.math_backend = math_backend  # False: PyTorch's own kernel (unbatched passes)

    def forward(self, batch: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiled caller sets it (dynamo can't)
            return scalar(self.loss_fn(self.model, batch))
        with (plain_attention(math_backend=self.math_backend, enabled=self.attention),
              quiet_vmap_fallback()):  # fmt: skip
            return scalar(self.loss_fn(self.model, batch))


@contextmanager
def quiet_vmap_fallback():
    """Without vmap's warning for an operation with no batching rule (an LSTM's, a sparse
    embedding's gradient, say): its per-sample fallback works, and the warning ("file us an
    issue") is nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
        yield


def scalar(loss: Any) -> Any:
    """A one-element loss (shape (1,), say) as a 0-d tensor; anything else as it is (the
    loss at w* was checked: :func:`slt.posterior.check_scalar_loss`)."""
    if isinstance(loss, torch.Tensor) and loss.dim() and loss.numel() == 1:
        return loss.reshape(())
    return loss


def per_sample(loss_fn: LossFn) -> LossFn:
    """``(model, batch) -> (b,)`` per-sample NLLs for ``loss_fn``.

    The adapters here carry an exact ``per_sample``; for any other ``loss_fn`` each sample
    is evaluated as a batch of one under ``torch.func.vmap`` (or, if the model cannot be
    vmapped, one at a time), so the batch mean of the result equals ``loss_fn``'s value.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> batch = (torch.randn(5, 2), torch.randn(5, 1))
    >>> losses = per_sample(gaussian_nll(0.5))(model, batch)
    >>> losses.shape, torch.allclose(losses.mean(), gaussian_nll(0.5)(model, batch))
    (torch.Size([5]), True)
    """
    exact = getattr(loss_fn, "per_sample", None)
    if exact is not None:
        return exact
    return _by_sample(loss_fn)


def _by_sample(loss_fn: LossFn) -> LossFn:
    """Per-sample values of ``loss_fn``, each sample a batch of one (:func:`per_sample`)."""

    def one(model, sample):
        return loss_fn(model, unsqueeze(sample))

    def by_sample(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        try:
            return torch.func.vmap(lambda s: one(model, s))(batch)
        except Exception:  # data-dependent control flow, in-place ops, ...: one at a time
            size = _batch_size(batch)
            return torch.stack([one(model, _index(batch, i)) for i in range(size)])

    return by_sample


def unsqueeze(sample: Any) -> Any:
    """A batch of one from a single sample (a leading dimension on every tensor)."""
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0)
    if isinstance(sample, dict):
        return {k: unsqueeze(v) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(unsqueeze(v) for v in sample)
    return sample


def _index(batch: Any, i: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: _index(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index(v, i) for v in batch)
    return batch


def _batch_size(batch: Any) -> int:
    from slt.data import batch_size

    return batch_size(batch)


def _takes_reduction(criterion: Callable) -> bool:
    try:
        return "reduction" in inspect.signature(criterion).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


class supervised:  # noqa: N801 -- used like a function: slt.supervised(F.cross_entropy)
    """``loss_fn`` for ``(x, y)`` batches: ``criterion(model(x), y)``.

    ``criterion`` must return the batch mean of a per-sample NLL, e.g.
    ``torch.nn.functional.cross_entropy`` or ``torch.nn.CrossEntropyLoss()`` (whose
    ``reduction`` must then be "mean"); ``per_sample`` calls a function with
    ``reduction="none"`` and a loss module as a copy with that reduction (a criterion that
    takes no ``reduction`` is evaluated a sample at a time, :func:`per_sample`). A
    module-level class, so it pickles (for process pools) when ``criterion`` does.

    Examples
    --------
    >>> import torch
    >>> import torch.nn.functional as F
    >>> loss_fn = supervised(F.cross_entropy)
    >>> model = torch.nn.Linear(3, 2)
    >>> batch = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    >>> loss_fn(model, batch).item() > 0
    True
    """

    def __init__(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if not callable(criterion):
            raise TypeError(f"supervised: criterion must be callable, got {criterion!r}")
        self.criterion = criterion
        weight = (criterion.keywords.get("weight") if isinstance(criterion, partial)
                  else getattr(criterion, "weight", None))  # fmt: skip
        if isinstance(weight, torch.Tensor):  # CrossEntropyLoss(weight=...), NLLLoss(...)
            warnings.warn(
                f"supervised: {criterion!r} has a class weight, so its batch value is the "
                "weighted mean Σ w_y ℓ / Σ w_y, not a mean of per-sample terms: a minibatch's "
                "value is then a biased estimate of L_n, and record='per_sample' refuses it. "
                "For class weights in the likelihood, pass a loss_fn returning the plain mean "
                "F.cross_entropy(model(x), y, weight=w, reduction='none').mean()",
                UserWarning,
                stacklevel=2,
            )
        self._unreduced = None  # the criterion per sample, where it says how
        if isinstance(criterion, torch.nn.modules.loss._Loss):
            if criterion.reduction != "mean":
                raise ValueError(
                    f"supervised: criterion must return the batch mean, got {criterion!r} "
                    f"with reduction={criterion.reduction!r}; use reduction='mean'"
                )
            self._unreduced = copy.copy(criterion)
            self._unreduced.reduction = "none"
        elif _takes_reduction(criterion):
            self._unreduced = partial(criterion, reduction="none")

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = _pair(batch)
        return self.criterion(_output(model, x), y)

    def per_sample(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if self._unreduced is None:
            return _by_sample(self)(model, batch)
        x, y = _pair(batch)
        losses = self._unreduced(_output(model, x), y)
        return losses.reshape(losses.shape[0], -1).mean(1)

    def __repr__(self) -> str:
        return f"supervised({getattr(self.criterion, '__name__', repr(self.criterion))})"


def _pair(batch: Any) -> tuple[Any, Any]:
    """``batch`` as ``(x, y)``, or a ``TypeError`` saying what it was."""
    try:
        x, y = batch
    except (TypeError, ValueError):
        what = (f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor)
                else f"{type(batch).__name__} {batch!r:.80}")  # fmt: skip
        raise TypeError(
            f"slt.supervised and slt.gaussian_nll take (x, y) batches, got {what}; give a "
            "loss_fn(model, batch) of your own for other batches"
        ) from None
    return x, y


def _output(model: torch.nn.Module, x: Any) -> torch.Tensor:
    """``model(x)``, which must be a tensor (a tuple or dict needs a loss_fn of one's own)."""
    out = model(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"slt.supervised and slt.gaussian_nll need a model that returns a tensor, got "
            f"{type(out).__name__}; for a tuple or dict output write loss_fn(model, batch) "
            "yourself, e.g. F.cross_entropy(model(x)['logits'], y)"
        )
    return out


class gaussian_nll:  # noqa: N801 -- used like a function: slt.gaussian_nll(sigma)
    """``loss_fn`` for regression with Gaussian noise of standard deviation ``sigma``.

    Per sample, -log N(y | f(x), σ² I) = ‖y - f(x)‖² / (2σ²) + k log σ + (k/2) log 2π,
    for k output dimensions; the result is the batch mean. A module-level class, so it
    pickles (for process pools).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> _ = torch.nn.init.zeros_(model.weight)
    >>> batch = (torch.ones(2, 1), torch.ones(2, 1))
    >>> round(gaussian_nll(1.0)(model, batch).item(), 4)  # 1/2 + log(2π)/2
    1.4189
    """

    def __init__(self, sigma: float = 1.0):
        sigma = _checks.real("gaussian_nll: sigma", sigma, minimum=0, strict=True)
        self.sigma = sigma
        self._inv_two_var = 1.0 / (2.0 * sigma * sigma)
        self._const = math.log(sigma) + 0.5 * math.log(2 * math.pi)

    def per_sample(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = _pair(batch)
        residual = (_output(model, x) - y).reshape(y.shape[0], -1)
        return residual.square().sum(1) * self._inv_two_var + residual.shape[1] * self._const

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.per_sample(model, batch).mean()

    def __repr__(self) -> str:
        return f"gaussian_nll(sigma={self.sigma:g})"


class next_token_nll:  # noqa: N801 -- used like a function: slt.next_token_nll()
    """``loss_fn`` for a language model, where a sample is a sequence: each sequence's
    next-token NLL **summed** over its positions, the batch mean of that.

    That is the per-sample NLL slt's nβ = n / log n (n sequences) is for. The per-token
    mean (``F.cross_entropy``'s default) is that NLL divided by the positions, and behaves
    like nβ that many times smaller: a hotter posterior (README, "Coming from devinterp").

    A batch is a ``(batch, length)`` tensor of token ids, a tuple or list whose first item
    is one (a ``TensorDataset`` of ids), or a dict with ``"input_ids"``; the model maps ids
    to logits ``(batch, length, vocabulary)``, as a tensor or as an output with ``.logits``
    or ``["logits"]`` (Hugging Face's causal LMs). Targets equal to ``ignore_index`` (a
    right-padded sequence's pad id) add nothing. A module-level class, so it pickles.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(5, 5))
    >>> _ = torch.nn.init.zeros_(model[0].weight)  # uniform next-token distribution
    >>> ids = torch.tensor([[0, 1, 2, 3], [4, 3, 2, 1]])
    >>> round(next_token_nll()(model, ids).item(), 4)  # 3 positions × log 5
    4.8283
    """

    def __init__(self, ignore_index: int | None = None):
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise TypeError(
                f"next_token_nll: ignore_index must be an int or None, got {ignore_index!r}"
            )
        self.ignore_index = ignore_index

    def per_sample(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        ids = _token_ids(batch)
        logits = _logits(model(ids))
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                f"slt.next_token_nll: the model's logits must be (batch, length, vocabulary) "
                f"for ids of shape {tuple(ids.shape)}, got {tuple(logits.shape)}"
            )
        targets = ids[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, reduction="none",
            ignore_index=-100 if self.ignore_index is None else self.ignore_index,
        )  # fmt: skip
        return losses.sum(1)

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.per_sample(model, batch).mean()

    def __repr__(self) -> str:
        return f"next_token_nll(ignore_index={self.ignore_index})"


def _token_ids(batch: Any) -> torch.Tensor:
    """The ``(batch, length)`` integer ids in ``batch``, or a ``TypeError`` saying what it was."""
    ids = batch
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
    elif isinstance(batch, tuple | list) and batch:
        ids = batch[0]
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
            and not ids.is_complex()):  # fmt: skip
        what = (f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                else f"{type(batch).__name__} {batch!r:.80}")  # fmt: skip
        raise TypeError(
            "slt.next_token_nll takes batches of integer token ids, (batch, length): a tensor, "
            f"a tuple or list starting with one, or a dict with 'input_ids'; got {what}"
        )
    return ids


def _logits(out: Any) -> torch.Tensor:
    """A model's logits: the output itself, its ``.logits`` or its ``["logits"]``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"slt.next_token_nll needs a model that returns logits (a tensor, or an output "
            f"with .logits or ['logits']), got {type(out).__name__}"
        )
    return logits
