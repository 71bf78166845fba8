"""The localized tempered posterior of a user's model, as a function of its parameters.

p(w) ∝ exp(-nβ L_n(w) - (γ/2) ‖w - w*‖²), with L_n the mean per-sample NLL over n
samples (Lau et al. 2023, arXiv 2308.12108). ``Posterior`` binds the user's model,
data and ``loss_fn`` into the two things samplers need: the minibatch loss gradient at a
parameter set, and the loss at w* on the same batch (the control variate). It works on
two private copies of the model in eval mode -- one that holds the chain's parameters
and one that stays at w* -- so the user's model, its mode and its gradients are never
touched.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch

from slt import _checks, attention
from slt.attention import has_attention, plain_attention
from slt.data import BatchStream, batch_size
from slt.factors import LinearFactors, linear_owners, record_factors
from slt.losses import LossFn, LossModule, scalar, unsqueeze
from slt.passes import (
    ChainPass,
    fixed_tensors,
    gradients_of,
    has_shared_modules,
    swapped_call,
)
from slt.traced import fingerprint

ControlVariate = Literal["loss", "gradient", "none"]
_CACHE_MAX_FLOATS = 2**24  # per-sample gradients at w* are cached up to 64 MB (float32)
_CACHE_MAX_PARAMS = 4096  # beyond this, gathering a batch's rows costs about a backward pass
# Samples per vmapped call when tabling micro-batches: on the benchmark's transformer a call's
# autograd temporaries set the first call's peak, +31 / +40 / +59 MB at 64 / 128 / 256
# samples (the table itself 18 MB), for 1.23 / 0.95 / 0.86 s of building
_GROUP_CHUNK = 128
# Micro-batches of at least this many samples are tabled by a plain forward and backward pass
# each instead: on that transformer (m = 32, 128 micro-batches) 0.29 s and no memory above a
# training step's, against 0.93 s and +64 MB for the vmapped passes in a fresh process (0.26 s
# and +34 MB once torch.func has run there); at m = 16, 0.45 s against 1.15 s (0.27 s warm)
_GROUP_PASS_MIN = 16
# microbatch="auto": the table's budget (16 MB of float32: why in the README, "Micro-batches")
# and the fewest micro-batches a batch may be drawn as
_AUTO_MAX_FLOATS = 2**22
_AUTO_MIN_GROUPS = 4
CONTROL_VARIATES = ("loss", "gradient", "none")

_STOCHASTIC_IN_TRAIN = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.dropout._DropoutNd,
)


def _train_mode_layers(model: torch.nn.Module) -> list[str]:
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if m.training and isinstance(m, _STOCHASTIC_IN_TRAIN)
    ]


ParamSelection = str | Sequence[str] | Callable[[str, torch.Tensor], bool] | None


def select_parameters(trainable: dict[str, torch.Tensor], params: ParamSelection) -> list[str]:
    """The names in ``trainable`` chosen by ``params`` (names or glob patterns, or a
    predicate on (name, parameter)); errors name what matched nothing."""
    if params is None:
        return list(trainable)
    if not (callable(params) or isinstance(params, (str, Sequence))):
        raise TypeError(
            f"params must be a name, a glob pattern, a list of them, or a predicate; got {params!r}"
        )
    if callable(params):
        chosen = [n for n, p in trainable.items() if params(n, p)]
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                f"params must be a name, a glob pattern, a list of them, or a predicate; got "
                f"{params!r}"
            )
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in trainable)]
        if unmatched:
            raise ValueError(
                f"params: {unmatched} match no trainable parameter; the trainable ones are "
                f"{list(trainable)[:8]}{' ...' if len(trainable) > 8 else ''}"
            )
        chosen = [n for n in trainable if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"params={params!r} selects no trainable parameter")
    return chosen


def _per_sample_table_fits(n: int, d: int) -> bool:
    """Whether per-sample gradients at w* of ``n`` samples and ``d`` parameters are tabled:
    at most ``_CACHE_MAX_PARAMS`` parameters and ``_CACHE_MAX_FLOATS`` numbers."""
    return n * d <= _CACHE_MAX_FLOATS and d <= _CACHE_MAX_PARAMS


def _finite_loss(value: float) -> float:
    """L_n(w*), unless it is NaN or infinite."""
    if not math.isfinite(value):
        raise ValueError(
            f"the loss at w* (the model as given) is {value}; check the model and loss_fn"
        )
    return value


def check_scalar_loss(loss: Any, *, where: str) -> torch.Tensor:
    """Raise unless ``loss`` is a floating 0-d (or one-element) tensor."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(
            f"loss_fn must return a floating scalar (the batch mean NLL), got a tensor of "
            f"shape {tuple(loss.shape)} and dtype {loss.dtype} {where}"
        )
    return loss.reshape(())


def mean_loss(module: torch.nn.Module, stream: BatchStream, loss_fn: LossFn) -> float:
    """L_n at ``module``'s weights: the sample-weighted mean of ``loss_fn`` over one complete
    pass of ``stream`` (no gradient), attention computed as the sampled loss computes it, not
    by PyTorch's no-grad fast path; NaN if the pass yields nothing."""
    total, count = 0.0, 0
    with torch.no_grad(), plain_attention(math_backend=False):
        for i, batch in enumerate(stream.complete_pass()):
            loss = check_scalar_loss(loss_fn(module, batch), where=f"on batch {i}")
            size = batch_size(batch)
            total += float(loss) * size
            count += size
    return total / count if count else math.nan


class Posterior:
    """Localized tempered posterior around the parameters of ``model`` (taken as w*).

    Parameters
    ----------
    model : torch.nn.Module
        The model at w*. Only its trainable (``requires_grad``) parameters are sampled.
    loader : re-iterable of batches
    loss_fn : callable ``(model, batch) -> Tensor``, the batch mean per-sample NLL.
    n : int, optional
        Number of samples behind L_n; defaults to the samples one pass over the loader
        yields (short last batch included): ``len(loader.dataset)`` for a plain loader.
    nbeta : float, optional
        Inverse temperature times n; defaults to n / log n (β* = 1/log n, Watanabe 2013).
    localization : float
        γ ≥ 0, strength of the Gaussian pull toward w*.
    control_variate : {"loss", "gradient", "none"}
        "loss": evaluate L_B(w*) on every batch, to subtract from L_B(w) in estimators.
        "gradient": also replace ∇L_B(w) by ∇L_B(w) - ∇L_B(w*) + ∇L_n(w*), an unbiased
        gradient with far less minibatch noise near w* (Baker, Fearnhead, Fox & Nemeth
        2019, "Control variates for stochastic gradient MCMC", Stat. Comput. 29).
        "none": neither.
    prior_mean : float, optional
        None (default): the Gaussian term is the localization (γ/2)‖w - w*‖² around w*.
        A number μ: it is instead a proper prior N(μ, γ⁻¹ I) on every sampled parameter,
        -(γ/2)‖w - μ‖², so the target is the global tempered posterior (for WBIC and free
        energies); chains still start at w* and w* stays the control-variate reference.
    params : names, glob patterns, or a predicate ``(name, parameter) -> bool``, optional
        Sample only these trainable parameters and hold the rest at w*: the
        weight-refined LLC of that part of the network (Wang et al. 2024, arXiv 2410.02984).
        Default: all trainable parameters.
    microbatch : int, optional
        Draw every minibatch as whole micro-batches of this many samples, from a random
        partition of the data drawn once from ``seed`` (shuffled in groups each epoch), so
        that the control variates read L_B(w*) and ∇L_B(w*) from a table with a row per
        micro-batch (built here, one pass) instead of a pass at w* on every batch. It must
        divide n and the batch size, the table must fit ``_CACHE_MAX_FLOATS`` numbers, and
        the loss must be a mean of per-sample terms; ``DataLoader`` over a
        ``TensorDataset`` only, not with ``full_batch``. "auto": a size where the gradient
        control variate would otherwise run a pass at w* on every batch, else None
        (:meth:`_auto_microbatch`); :attr:`microbatch` is the size taken.
    seed : int
        Seed of the partition into micro-batches.
    full_batch : bool
        Give every step the whole dataset as one batch (:meth:`stream`), as MALA needs:
        the full tensors of a ``DataLoader`` over a ``TensorDataset``, or the one batch of a
        loader that yields exactly one per epoch. Otherwise ``slt.data.NotOneBatch``
        (a ``ValueError``) is raised.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loader: Iterable,
        loss_fn: LossFn,
        *,
        n: int | None = None,
        nbeta: float | None = None,
        localization: float = 1.0,
        control_variate: ControlVariate = "gradient",
        full_batch: bool = False,
        prior_mean: float | None = None,
        params: ParamSelection = None,
        microbatch: int | str | None = None,
        seed: int = 0,
    ):
        if control_variate not in CONTROL_VARIATES:
            raise ValueError(
                f"control_variate must be one of {CONTROL_VARIATES}, got {control_variate!r}"
            )
        self.control_variate = control_variate
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        localization = _checks.real("localization", localization, minimum=0)
        self.warnings: list[str] = []
        layers = _train_mode_layers(model)
        if layers:
            msg = (
                f"model is in training mode with BatchNorm/Dropout layers ({', '.join(layers[:3])}"
                f"{', ...' if len(layers) > 3 else ''}); the posterior is evaluated in eval mode "
                "on a copy (your model is left as it is)"
            )
            self.warnings.append(msg)

        self.module = copy.deepcopy(model).eval()
        self._replay = None  # the loop's passes replayed from traced graphs (replayed)
        self.reference = copy.deepcopy(model).eval()
        self._attention = True if has_attention(model) else None  # None: not known yet
        for p in (*self.module.parameters(), *self.reference.parameters()):
            p.grad = None
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        self.names = select_parameters(trainable, params)
        own = dict(self.module.named_parameters())
        for name, p in own.items():  # the rest stay at w* (weight-refined LLC)
            p.requires_grad_(name in self.names)
        ref = dict(self.reference.named_parameters())
        for name, p in ref.items():
            p.requires_grad_(control_variate == "gradient" and name in self.names)
        self.center = {name: ref[name] for name in self.names}
        self.params = {name: own[name] for name in self.names}
        first = self.params[self.names[0]]
        self.device, self.dtype = first.device, first.dtype
        self.loss_fn = loss_fn
        self.batches = BatchStream(loader, self.device)
        self.full_data = self.batches.full_batch() if full_batch else None
        microbatch = _checks.microbatch(microbatch)
        auto = microbatch == "auto"
        if auto:
            microbatch = self._auto_microbatch()
        # With micro-batches, L_n(w*) and ∇L_n(w*) are the means of their tables' rows (the
        # groups partition the data): the pass over the data is left to the tables (_group)
        from_table = (microbatch is not None and control_variate != "none"
                      and self.full_data is None and self.batches.tensors is not None)  # fmt: skip
        self.init_loss, counted, self.init_grad = self._full_loss_at_center(first_only=from_table)
        # n: the samples L_n(w*) was taken over, one complete pass (the subset a sampler
        # picks, every sample when the loader drops a short last batch)
        self.n = _checks.integer("n", n if n is not None else counted, minimum=2)
        self.nbeta = (
            _checks.real("nbeta", nbeta, minimum=0, strict=True)
            if nbeta is not None
            else self.n / math.log(self.n)
        )
        self.localization = localization
        if prior_mean is None:
            self.anchor = self.center
        else:
            mean = _checks.real("prior_mean", prior_mean)
            self.anchor = {k: torch.full_like(v, mean) for k, v in self.center.items()}
        self.prior_mean = prior_mean
        self._cache_built = False  # built on first use: the vmapped step does not need it
        self.microbatch = self._group_of = None  # (n,) sample -> its micro-batch (_group)
        if microbatch is not None:
            try:
                self._group(microbatch, seed)
            except ValueError:
                if not auto:
                    raise
                self._ungroup()  # e.g. a model torch.func cannot vmap: the passes at w*

    def stream(self, generator: torch.Generator) -> Iterator[tuple[Any, Any]]:
        """The (batch, sample indices) of one chain: minibatches drawn with ``generator``
        epoch after epoch, or with ``full_batch`` the whole dataset at every step. The
        indices are None where the loader does not expose them."""
        if self.full_data is not None:
            return itertools.repeat((self.full_data, None))
        return self.batches.forever(generator, indexed=True)

    def _auto_microbatch(self) -> int | None:
        """``microbatch="auto"``: the micro-batch size where the gradient control variate
        would otherwise run a forward and backward pass at w* on every batch, else None.

        That is where the data's tensors are known and shuffled per sample, and neither a
        per-sample gradient table (:attr:`gradient_table_fits`) nor the factors of
        ``nn.Linear`` layers (:mod:`slt.factors`) can stand in for the pass: a model with
        attention, normalisation or convolutions and more than ``_CACHE_MAX_PARAMS``
        parameters. The size is the smallest common divisor m >= 2 of the data's size and
        the batch size whose table ((data / m) × d numbers) fits ``_AUTO_MAX_FLOATS``,
        with at least ``_AUTO_MIN_GROUPS`` micro-batches in a batch; None if there is
        none."""
        tensors, bs = self.batches.tensors, getattr(self.batches.loader, "batch_size", None)
        if (self.control_variate != "gradient" or self.full_data is not None or tensors is None
                or not self.batches.shuffle or not bs):  # fmt: skip
            return None
        rows, d = tensors[0].shape[0], self.num_params  # (self.n is not known yet)
        if _per_sample_table_fits(rows, d) or linear_owners(self) is not None:
            return None  # the per-sample table, or perhaps the factors
        for m in range(2, bs // _AUTO_MIN_GROUPS + 1):
            if rows % m == 0 and bs % m == 0 and rows // m * d <= _AUTO_MAX_FLOATS:
                return m
        return None

    def _ungroup(self) -> None:
        """Undo :meth:`_group` after it failed for ``microbatch="auto"``: batches per
        sample, and the pass over the data at w* the tables were to stand for."""
        self.batches.groups, self.microbatch, self._group_of = None, None, None
        self._cache_built = False
        if self.init_loss is None:
            self.init_loss, _, self.init_grad = self._full_loss_at_center()

    def _group(self, size: int, seed: int) -> None:
        """Micro-batches of ``size`` samples (the ``microbatch`` argument): the partition,
        then the tables at w*, built now so that what they need is checked here."""
        if self.control_variate == "none" or self.full_data is not None:
            why = ("with control_variate='none'" if self.full_data is None
                   else "with the whole dataset as every batch")  # fmt: skip
            raise ValueError(f"microbatch={size}: there is no table at w* to read {why}")
        groups = self.batches.group(size, torch.Generator().manual_seed(seed))
        count, d = groups.shape[0], self.num_params
        if self.control_variate == "gradient" and count * d > _CACHE_MAX_FLOATS:
            raise ValueError(
                f"microbatch={size}: a table of {count:,} micro-batches × {d:,} parameters "
                f"({count * d:,} numbers) is over the budget of {_CACHE_MAX_FLOATS:,} "
                "(slt.posterior._CACHE_MAX_FLOATS); use larger micro-batches"
            )
        self.microbatch = size
        self._group_of = torch.empty(groups.numel(), dtype=torch.long, device=groups.device)
        ids = torch.arange(count, device=groups.device)
        self._group_of[groups.reshape(-1)] = ids.repeat_interleave(size)
        self._build_cache()
        if self._cache_loss is None:
            raise ValueError(
                f"microbatch={size}: the loss is not a mean of per-sample terms, or the model "
                "cannot be evaluated on a micro-batch under torch.func.vmap (the table at w* "
                "could not be built); leave microbatch=None"
            )

    def table_rows(self, index):
        """The rows of the tables at w* (:attr:`cache_loss`, :attr:`cache_grad`) for a
        batch's sample ``index``: the index itself, or with micro-batches the batch's
        micro-batches (every ``microbatch``-th sample is the next one's first)."""
        if self.microbatch is None:
            return index
        size = self.microbatch
        if isinstance(index, slice):
            return slice(index.start // size, -(-index.stop // size))
        return self._group_of[index[..., ::size]]

    def table_loss(self, index) -> torch.Tensor:
        """L_B(w*) from the table of losses at w* (:attr:`cache_loss`) for a batch's sample
        ``index`` ((b,) or (chain, b): a mean per chain)."""
        return batch_mean(self.cache_loss, self.table_rows(index))

    def table_correction(self, index) -> tuple[list[torch.Tensor], torch.Tensor]:
        """From the tables at w*, for a batch's sample ``index`` ((b,) or (chain, b)):
        ∇L_B(w*) − ∇L_n(w*) shaped like the sampled parameters (with the index's leading
        dimensions) and L_B(w*)."""
        rows = self.table_rows(index)
        flat = batch_mean(self.cache_grad, rows) - self._init_grad_flat
        return self.unflatten(flat), batch_mean(self.cache_loss, rows)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(..., d) numbers in the sampled parameters' order as views shaped (..., *shape)."""
        lead = flat.shape[:-1]
        pieces = flat.split(self._sizes, -1)
        return [c.reshape((*lead, *p.shape)) for c, p in zip(pieces, self.center.values())]

    @property
    def cache_loss(self) -> torch.Tensor | None:
        """(n,) per-sample losses at w* ((n/m,) micro-batch losses with micro-batches of m),
        or None (see :meth:`_build_cache`)."""
        if not self._cache_built:
            self._build_cache()
        return self._cache_loss

    @property
    def cache_grad(self) -> torch.Tensor | None:
        """(n, d) per-sample gradients at w* ((n/m, d) with micro-batches), or None (see
        :meth:`_build_cache`)."""
        if not self._cache_built:
            self._build_cache()
        return self._cache_grad

    @property
    def factors(self) -> LinearFactors | None:
        """The per-sample factors of ∇L_B(w*) (:mod:`slt.factors`), where the gradient
        control variate has no per-sample gradient table; else None."""
        if not self._cache_built:
            self._build_cache()
        return self._factors

    @property
    def gradient_table_fits(self) -> bool:
        """Whether per-sample gradients at w* would be tabled (:meth:`_build_cache`): at
        most ``_CACHE_MAX_PARAMS`` parameters and ``_CACHE_MAX_FLOATS`` numbers."""
        if self.microbatch is not None:  # checked against the budget by _group
            return True
        return _per_sample_table_fits(self.n, self.num_params)

    def _build_cache(self) -> None:
        """Per-sample losses (and gradients) at w* of every sample, so that the control
        variates on a batch are a gather and a mean instead of a forward (and backward)
        pass: L_B(w*) = mean_{i∈B} ℓ_i(w*), ∇L_B(w*) = mean_{i∈B} ∇ℓ_i(w*). Where the
        gradients do not fit (:attr:`gradient_table_fits`), the factors of a model of
        ``nn.Linear`` layers (:mod:`slt.factors`) stand in for them.

        Only for the ``TensorDataset`` fast path (sample indices known) and a loss that is a
        mean of per-sample terms (checked on a batch); otherwise nothing is cached and the
        passes at w* run. Built on first use (the loop's :meth:`at_center`, the vmapped
        step's factors), not by the constructor."""
        self._cache_built = True
        self._cache_loss = self._cache_grad = self._factors = None
        tensors = self.batches.tensors
        if self.control_variate == "none" or tensors is None or self.full_data is not None:
            return
        want_grad = self.control_variate == "gradient" and self.gradient_table_fits
        factors = None
        if self.control_variate == "gradient" and not want_grad:
            try:
                factors = record_factors(self, tensors)
            except Exception:  # a model or loss the recording pass cannot run: the passes at w*
                return
            if factors is None:
                return
        groups = self.batches.groups
        try:
            losses, grads = self._per_sample_at_center(tensors, want_grad, groups)
        except Exception:  # the model or loss cannot be vmapped: keep the passes at w*
            return
        if self.init_loss is None:  # the table stands for the pass over the data
            _finite_loss(float(losses.double().mean()))
        rows = 64 if groups is None else min(4, groups.shape[0])  # samples, or micro-batches
        probe = [t[:rows].clone() if groups is None else t[groups[:rows].reshape(-1)]
                 for t in tensors]  # fmt: skip
        with torch.set_grad_enabled(want_grad):
            loss = self.loss(self.reference, probe)
            if not torch.allclose(losses[:rows].mean(), loss.detach(), rtol=1e-4, atol=1e-6):
                return  # not a mean of per-sample terms
            if want_grad:
                flat = torch.cat(
                    [g.reshape(-1) for g in self._grads(loss, list(self.center.values()))]
                )
                if not torch.allclose(grads[:rows].mean(0), flat, rtol=1e-3, atol=1e-5):
                    return
        self._cache_loss, self._factors = losses, factors
        if want_grad:
            self._cache_grad = grads
            self._sizes = [p.numel() for p in self.center.values()]
        if self.init_loss is None:  # micro-batches of equal size that partition the data
            self.init_loss = float(losses.double().mean())
            if want_grad:
                self.init_grad = [g.clone() for g in self.unflatten(grads.mean(0))]
        if want_grad:
            self._init_grad_flat = torch.cat([g.reshape(-1) for g in self.init_grad])

    def _per_sample_at_center(self, tensors, want_grad: bool, groups=None, chunk: int = 256):
        """Losses (and flat gradients) at w* of every sample, or with ``groups`` (an (n/m,
        m) partition) of every micro-batch: (rows,) and (rows, d), about ``chunk`` samples a
        vmapped call, written into the tables as they come (no second copy of the table);
        micro-batches of ``_GROUP_PASS_MIN`` samples or more by a pass each
        (:meth:`_group_passes`)."""
        grouped = groups is not None
        if grouped and groups.shape[1] >= _GROUP_PASS_MIN:
            return self._group_passes(tensors, want_grad, groups)
        from torch.func import grad_and_value, vmap

        module = LossModule(self.reference, self.loss_fn, attention=self.attention)
        names = self.names
        center = {n: v.detach() for n, v in self.center.items()}
        shared = has_shared_modules(module)

        def one(params, sample):  # a sample, or with groups a micro-batch
            swapped = {f"model.{n}": params[n] for n in names}
            return swapped_call(module, swapped, (sample if grouped else unsqueeze(sample),),
                                shared=shared)  # fmt: skip

        if grouped:  # (n/m, m, ...): a micro-batch per row
            tensors = [t[groups] for t in tensors]
            chunk = max(1, min(chunk, _GROUP_CHUNK) // groups.shape[1])
        rows = tensors[0].shape[0]
        fn = vmap(grad_and_value(one) if want_grad else one, in_dims=(None, 0))
        losses, grads = None, None
        if want_grad:
            grads = torch.empty(rows, self.num_params, dtype=self.dtype, device=self.device)
        for start in range(0, rows, chunk):
            # copies: a view would let a model that edits its input edit the user's tensors
            out = fn(center, [t[start : start + chunk].clone() for t in tensors])
            value = out[1] if want_grad else out
            if losses is None:
                losses = torch.empty(rows, dtype=value.dtype, device=value.device)
            losses[start : start + chunk] = value.detach()
            if want_grad:
                column = 0
                for n in names:
                    g = out[0][n].detach()
                    size = g[0].numel()
                    grads[start : start + chunk, column : column + size] = g.reshape(len(g), -1)
                    column += size
        return losses, grads

    def _group_passes(self, tensors, want_grad: bool, groups: torch.Tensor):
        """:meth:`_per_sample_at_center` for micro-batches of ``_GROUP_PASS_MIN`` samples or
        more: the loss (and flat gradient) of each micro-batch by a pass of its own."""
        count = groups.shape[0]
        losses = torch.empty(count, dtype=self.dtype, device=self.device)
        grads = None
        if want_grad:
            grads = torch.empty(count, self.num_params, dtype=self.dtype, device=self.device)
        center = list(self.center.values())
        for row, index in enumerate(groups):
            batch = [t[index] for t in tensors]
            with torch.set_grad_enabled(want_grad):
                loss = self.loss(self.reference, batch)
            losses[row] = loss.detach()
            if want_grad:
                torch.cat([g.reshape(-1) for g in self._grads(loss, center)], out=grads[row])
        return losses, grads

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _full_loss_at_center(self, first_only: bool = False):
        """L_n(w*) as the sample-weighted mean of batch losses over one pass (or on the full
        batch), the count, and (for the gradient control variate) ∇L_n(w*). ``first_only``:
        check the loss on the first batch and return (None, the dataset's size, None); the
        micro-batch tables then give L_n(w*) and ∇L_n(w*) (:meth:`_build_cache`)."""
        if first_only:
            batch = next(iter(self.batches.complete_pass()))
            with torch.no_grad():
                check_scalar_loss(self.loss(self.reference, batch), where="on batch 0")
            return None, self.batches.tensors[0].shape[0], None
        total, count = 0.0, 0
        with_grad = self.control_variate == "gradient"
        center = list(self.center.values())
        grad = [torch.zeros_like(p) for p in center] if with_grad else None
        with torch.set_grad_enabled(with_grad):
            batches = self.batches.complete_pass() if self.full_data is None else [self.full_data]
            for i, batch in enumerate(batches):
                loss = check_scalar_loss(self.loss(self.reference, batch), where=f"on batch {i}")
                size = batch_size(batch)
                if with_grad:
                    torch._foreach_add_(grad, self._grads(loss, center), alpha=size)
                total += float(loss.detach()) * size
                count += size
        if count == 0:
            raise ValueError("loader: yielded no batches (is the dataset empty?)")
        value = _finite_loss(total / count)
        if with_grad:
            torch._foreach_div_(grad, count)
        return value, count, grad

    @property
    def attention(self) -> bool:
        """Whether the model has attention (:meth:`loss`; known once it has been evaluated,
        which construction does)."""
        return self._attention is not False

    def loss(self, module: torch.nn.Module, batch: Any, *, twice: bool = False) -> torch.Tensor:
        """``loss_fn(module, batch)``; for a model with attention (an
        ``nn.MultiheadAttention``, or calls of ``scaled_dot_product_attention`` seen in the
        first evaluation) with attention as the batched passes compute it
        (:func:`slt.attention.plain_attention`; short sequences by parts: 1.25x faster than
        PyTorch's flash kernel through ``nn.TransformerEncoderLayer`` at 8 keys, even on a
        nanoGPT-style block). ``twice``: the loss will be differentiated
        twice, so attention runs on the math backend (PyTorch's flash attention has no
        second derivative)."""
        before = attention.calls
        with plain_attention(math_backend=twice, enabled=self.attention or twice):
            loss = scalar(self.loss_fn(module, batch))
        if self._attention is None:
            self._attention = attention.calls > before
        return loss

    @staticmethod
    def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return gradients_of(loss, params)

    def _eager_pass(self, module: torch.nn.Module, params: list[torch.Tensor], batch: Any,
                    *_tensors: torch.Tensor):  # fmt: skip
        """(∇L_B, L_B) at ``module``'s own ``params``, through the model's own call (a
        replayed pass's ``tensors``, which are them and what else it reads, go unused)."""
        loss = self.loss(module, batch)
        return self._grads(loss, params), loss.detach()

    def _python_state(self) -> Any:
        """The plain Python state of both copies of the model (:func:`slt.traced.fingerprint`)."""
        return fingerprint(self.module), fingerprint(self.reference)

    @contextmanager
    def replayed(self, *, trace: bool, alone: bool | None = None):
        """Within the block, :meth:`grad_fn` and the gradient control variate's pass at w*
        (:meth:`at_center`) are replayed from a traced graph where one can be
        (:mod:`slt.traced`, through :class:`slt.passes.ChainPass`; the same operations, so
        the same numbers): traced on first use if ``trace``, else only graphs kept from an
        earlier run; ``alone`` replaces ``trace`` where a graph cannot be kept for other runs
        (:meth:`slt.passes.ChainPass.replayed`). Where there is no graph they run as before,
        through the model's own call."""
        chain_pass = ChainPass(self)
        sampled, center = list(self.params.values()), list(self.center.values())
        passes = []
        for module, params in ((self.module, sampled), (self.reference, center)):
            extras = list(fixed_tensors(module, self.names).values())
            run = chain_pass.replayed(self, trace=trace, alone=alone, batched=False,
                                      eager=partial(self._eager_pass, module, params),
                                      state=self._python_state)  # fmt: skip
            # detached aliases: the graph's operations then record nothing for autograd
            passes.append((run, [*(p.detach() for p in params), *extras]))
        self._replay = passes
        try:
            yield
        finally:
            self._replay = None

    def reset(self) -> dict[str, torch.Tensor]:
        """Put the chain parameters back at w* and return them (the sampler's init)."""
        with torch.no_grad():
            torch._foreach_copy_(list(self.params.values()), list(self.center.values()))
        return self.params

    def grad_fn(self, params: dict[str, torch.Tensor], batch: Any, correction=None, record=None):
        """(∇L_B(w) [- correction], L_B(w)) for the chain parameters (those of ``reset``).

        ``record``, a list of tensors shaped like the parameters, receives a copy of the
        plain ∇L_B(w) before the correction is applied.
        """
        if params is not self.params:
            raise ValueError("Posterior.grad_fn takes the parameter dict returned by reset()")
        if self._replay is not None:
            run, tensors = self._replay[0]
            grads, loss = run(batch, *tensors)
        else:
            grads, loss = self._eager_pass(self.module, list(params.values()), batch)
        if record is not None:
            torch._foreach_copy_(record, grads)
        if correction is not None:
            torch._foreach_sub_(grads, correction)
        return grads, loss

    def at_center(self, batch: Any, index=None):
        """(L_B(w*) or None, the ``grad_fn`` to use on this batch), per ``control_variate``;
        from the per-sample cache when the batch's sample ``index`` is known."""
        if self.control_variate == "none":
            return None, self.grad_fn
        if index is not None and self.cache_loss is not None:
            if self.control_variate == "loss":
                return self.table_loss(index), self.grad_fn
            if self.cache_grad is not None:  # per-sample or micro-batch gradients
                correction, loss = self.table_correction(index)
                return loss, partial(self.grad_fn, correction=correction)
            correction = self.factors.gradient_sums(index)  # the factors of nn.Linear layers
            torch._foreach_div_(correction, float(batch_size(batch)))
            torch._foreach_sub_(correction, self.init_grad)
            return self.table_loss(index), partial(self.grad_fn, correction=correction)
        if self.control_variate == "loss":
            with torch.no_grad():
                return self.loss(self.reference, batch).detach(), self.grad_fn
        if self._replay is not None:
            run, tensors = self._replay[1]
            correction, loss = run(batch, *tensors)
        else:
            correction, loss = self._eager_pass(self.reference, list(self.center.values()), batch)
        torch._foreach_sub_(correction, self.init_grad)  # in place: one parameter set fewer
        return loss, partial(self.grad_fn, correction=correction)


def batch_mean(table: torch.Tensor, index) -> torch.Tensor:
    """Mean of the rows ``index`` of a per-sample ``table`` (n,) or (n, d): a slice, a
    (b,) index (one batch) or a (chain, b) index (a mean per chain). Large gathers go
    through a fused ``embedding_bag`` (~3x faster at 512 rows of 300 numbers, but ~30 µs of
    fixed cost that a small gather does not pay)."""
    if isinstance(index, slice):
        return table[index].mean(0)
    if table.dim() == 1 or table.shape[1] * index.numel() < _FUSED_GATHER_MIN:
        return table[index].mean(index.dim() - 1)
    out = torch.nn.functional.embedding_bag(index.view(-1, index.shape[-1]), table, mode="mean")
    return out[0] if index.dim() == 1 else out


_FUSED_GATHER_MIN = 32768  # numbers gathered; measured crossover ~20k on one CPU thread
