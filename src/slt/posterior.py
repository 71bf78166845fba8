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
from slt._checks import finite_loss_at_center
from slt._text import few
from slt.attention import has_attention, plain_attention
from slt.data import BatchStream, batch_size, tensors_in
from slt.losses import LossFn, scalar
from slt.passes import ChainPass, fixed_tensors, gradients_of
from slt.tables import Tables
from slt.traced import fingerprint

ControlVariate = Literal["loss", "gradient", "none"]
CONTROL_VARIATES = ("loss", "gradient", "none")
_HALF = {str(torch.float16), str(torch.bfloat16)}

_STOCHASTIC_IN_TRAIN = (
    torch.nn.modules.dropout._DropoutNd,
    torch.nn.RReLU,
)


def _acts_differently_in_training(m: torch.nn.Module) -> bool:
    if isinstance(m, _STOCHASTIC_IN_TRAIN):
        return True
    # without running statistics a norm layer uses the batch's in eval mode too
    if isinstance(
        m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.modules.instancenorm._InstanceNorm
    ):
        return m.track_running_stats
    return isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0


def _train_mode_layers(model: torch.nn.Module) -> list[str]:
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if m.training and _acts_differently_in_training(m)
    ]


ParamSelection = str | Sequence[str] | Callable[[str, torch.Tensor], bool] | torch.nn.Module | None


def names_of(model: torch.nn.Module, params: Any) -> Any:
    """``params`` given as the user's own submodule, parameter, or a list of them, as the
    parameters' names in ``model`` (found by identity, before the model is copied);
    anything else as it is."""
    items = params if isinstance(params, (list, tuple)) else [params]
    if not items or not all(isinstance(x, (torch.nn.Module, torch.Tensor)) for x in items):
        return params
    wanted = {id(p) for x in items
              for p in (x.parameters() if isinstance(x, torch.nn.Module) else [x])}  # fmt: skip
    names = [n for n, p in model.named_parameters() if id(p) in wanted]
    if not names:
        originals = [n for n, _ in model.named_parameters() if ".parametrizations." in n]
        hint = (f"; a parametrized weight is computed from its originals: select those "
                f"({few(originals, 3)}) or the submodule" if originals else "")  # fmt: skip
        raise ValueError(
            "params: the modules or parameters given are not parameters of model (pass "
            f"them from the model itself, or names such as 'head.*'){hint}"
        )
    return names


def select_parameters(trainable: dict[str, torch.Tensor], params: ParamSelection,
                      aliases: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """The names in ``trainable`` chosen by ``params`` (names or glob patterns, or a
    predicate on (name, parameter)); errors name what matched nothing. ``aliases`` maps
    every name a parameter has (a tied weight, a submodule registered twice) to its name
    in ``trainable``: a pattern or predicate may use any of them."""
    if params is None:
        return list(trainable)
    if isinstance(params, torch.nn.Module) or not (
        callable(params) or isinstance(params, (str, Sequence))
    ):
        raise TypeError(
            "params must be a name, a glob pattern, a list of them, a predicate on (name, "
            f"parameter), or the model's own submodule or parameters; got {params!r}"
        )
    aliases = aliases or {n: n for n in trainable}
    if callable(params):
        picked = {aliases[n] for n in aliases if params(n, trainable[aliases[n]])}
    else:
        patterns = [params] if isinstance(params, str) else list(params)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise TypeError(
                "params must be a name, a glob pattern, a list of them, a predicate on (name, "
                f"parameter), or the model's own submodule or parameters; got {params!r}"
            )

        def matches(name: str, pattern: str) -> bool:  # an exact name may hold [ or ]
            return name == pattern or fnmatch.fnmatchcase(name, pattern)

        unmatched = [p for p in patterns if not any(matches(n, p) for n in aliases)]
        if unmatched:
            names = list(aliases)
            raise ValueError(
                f"params: {unmatched} match no trainable parameter; the trainable ones are "
                f"{names[:8]}{' ...' if len(names) > 8 else ''}"
            )
        picked = {aliases[n] for n in aliases if any(matches(n, p) for p in patterns)}
    chosen = [n for n in trainable if n in picked]
    if not chosen:
        hint = (
            " (a predicate is called with the names and the sampling copy's parameters, not "
            "the model's own: compare names, or pass the submodule itself as params)"
            if callable(params)
            else ""
        )
        raise ValueError(f"params={params!r} selects no trainable parameter{hint}")
    return chosen


def _copied(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model``, or an error naming what stops one: a tensor attribute
    that is the output of an operation (with a ``grad_fn``), such as the hook-based
    ``torch.nn.utils.weight_norm``'s weight or a kept activation."""
    try:
        return copy.deepcopy(model)
    except (TypeError, copy.Error) as err:  # a lock, a file handle, a generator...
        bad = []
        for name, m in model.named_modules():
            for k, v in vars(m).items():
                if k in ("_parameters", "_buffers", "_modules") or bad:
                    continue
                try:
                    copy.deepcopy(v)
                except Exception:  # noqa: BLE001 - any failure names the attribute
                    bad.append(f"{name + '.' if name else ''}{k} ({type(v).__name__})")
        raise TypeError(
            "model cannot be copied with copy.deepcopy (slt samples a copy and never "
            f"touches yours): attribute {bad[0] if bad else 'unknown'} does not copy ({err}). "
            "Keep such objects outside the model, or give its class a __deepcopy__"
        ) from err
    except RuntimeError as err:
        if "deepcopy" not in str(err):
            raise
        held = [f"{name + '.' if name else ''}{k}" for name, m in model.named_modules()
                for k, v in vars(m).items()
                if isinstance(v, torch.Tensor) and v.grad_fn is not None]  # fmt: skip
        raise ValueError(
            "model cannot be copied (slt samples a copy): it holds tensors computed with "
            f"autograd ({', '.join(held[:4]) or 'an attribute'}); detach them, or for weight "
            "norm use torch.nn.utils.parametrizations.weight_norm"
        ) from err


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


class Posterior(Tables):
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
                "model is in training mode with layers that act differently there, as "
                f"BatchNorm and Dropout do ({', '.join(layers[:3])}"
                f"{', ...' if len(layers) > 3 else ''}); the posterior is evaluated in eval "
                "mode on a copy (your model is left as it is)"
            )
            self.warnings.append(msg)
        params = names_of(model, params)
        self.module = _copied(model).eval()
        self._replay = None  # the loop's passes replayed from traced graphs (replayed)
        self.reference = _copied(model).eval()
        self._attention = True if has_attention(model) else None  # None: not known yet
        for p in (*self.module.parameters(), *self.reference.parameters()):
            p.grad = None
        trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model has no trainable parameters (none with requires_grad=True)")
        first_name = {id(p): n for n, p in trainable.items()}
        aliases = {n: first_name[id(p)]
                   for n, p in self.module.named_parameters(remove_duplicate=False)
                   if id(p) in first_name}  # fmt: skip
        self.names = select_parameters(trainable, params, aliases)
        # what params= chose, for the result (None: every trainable parameter, the default)
        self.selection = None if params is None else tuple(self.names)
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
        complex_ = [n for n, p in self.params.items() if p.is_complex()]
        if complex_:  # torch.randn gives each real part variance 1/2: half the temperature
            raise ValueError(
                f"model: complex sampled parameters ({', '.join(complex_[:3])}) are not "
                "supported (their noise would be drawn at half the variance per real part); "
                "hold the real and imaginary parts as real parameters"
            )
        half = sorted({str(p.dtype) for p in self.params.values()} & _HALF)
        if half:
            raise ValueError(
                f"model: sampled parameters in {', '.join(half)}: an SGLD move smaller than "
                "half a step of that format is lost and the loss differences nβ(L(w) - "
                "L(w*)) round away (bfloat16 read λ̂ 4x too large in a test, MALA 0); sample "
                "a float32 copy: estimate_llc(model.float(), ...) with float32 inputs"
            )
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
        self.num_samples = counted  # in one pass of the loader (n may be given otherwise)
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
        self.per_sample_checked = False  # slt.record: per-sample terms average to L_n(w*)
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
        value = finite_loss_at_center(total / count)
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
            try:
                loss = scalar(self.loss_fn(module, batch))
            except (TypeError, AttributeError) as err:  # loss_fn=F.cross_entropy: torch
                # names no loss_fn ('list' object has no attribute 'size' for F.mse_loss)
                if self._attention is None:  # the first evaluation
                    err.add_note(
                        "slt calls loss_fn(model, batch) with the model and one batch of the "
                        "loader; for a criterion of (output, target) such as F.cross_entropy, "
                        "pass slt.supervised(F.cross_entropy)"
                    )
                raise
            except RuntimeError as err:  # float64 data into a float32 model: torch names no
                if self._attention is None and "dtype" in str(err):  # which is which
                    kinds = sorted({str(t.dtype) for t in tensors_in(batch)
                                    if t.is_floating_point()})  # fmt: skip
                    err.add_note(
                        f"the model's parameters are {self.dtype}, the batch's floating "
                        f"tensors {', '.join(kinds) or 'none'}: convert one to the other "
                        "(model.double(), or the data to float32)"
                    )
                raise
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
