"""The tables at w*: every sample's (or micro-batch's) loss and gradient at w*, so that the
control variates on a batch are a gather and a mean instead of a pass at w*.

L_B(w*) = mean_{i∈B} ℓ_i(w*) and ∇L_B(w*) = mean_{i∈B} ∇ℓ_i(w*) hold for a loss that is a
mean of per-sample terms (checked on a batch before a table is used). The rows are samples
where the gradients fit a budget, micro-batches of m samples where the batches are drawn as
whole micro-batches (``microbatch``), and otherwise the factors of ``nn.Linear`` layers
(:mod:`slt.factors`) stand in for the gradients. :class:`Tables` is the part of
:class:`slt.posterior.Posterior` that builds and reads them.
"""

from __future__ import annotations

import math

import torch

from slt._checks import finite_loss_at_center
from slt.factors import LinearFactors, linear_owners, record_factors
from slt.losses import LossModule, unsqueeze
from slt.passes import has_shared_modules, swapped_call

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
_FUSED_GATHER_MIN = 32768  # numbers gathered; measured crossover ~20k on one CPU thread


def per_sample_table_fits(n: int, d: int) -> bool:
    """Whether per-sample gradients at w* of ``n`` samples and ``d`` parameters are tabled:
    at most ``_CACHE_MAX_PARAMS`` parameters and ``_CACHE_MAX_FLOATS`` numbers."""
    return n * d <= _CACHE_MAX_FLOATS and d <= _CACHE_MAX_PARAMS


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


class Tables:
    """The tables at w* of a :class:`slt.posterior.Posterior` (its base: the attributes
    used here are the posterior's)."""

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
        if per_sample_table_fits(rows, d) or linear_owners(self) is not None:
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
                "(slt.tables._CACHE_MAX_FLOATS); use larger micro-batches"
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
        return per_sample_table_fits(self.n, self.num_params)

    def _build_cache(self) -> None:
        """Per-sample losses (and gradients) at w* of every sample, so that the control
        variates on a batch are a gather and a mean instead of a forward (and backward)
        pass: L_B(w*) = mean_{i∈B} ℓ_i(w*), ∇L_B(w*) = mean_{i∈B} ∇ℓ_i(w*). Where the
        gradients do not fit (:attr:`gradient_table_fits`), the factors of a model of
        ``nn.Linear`` layers (:mod:`slt.factors`) stand in for them.

        Only for the ``TensorDataset`` fast path (sample indices known) and a loss that is a
        mean of per-sample terms (checked on a batch); otherwise nothing is cached and the
        passes at w* run. Built on first use (the loop's
        :meth:`slt.posterior.Posterior.at_center`, the vmapped step's factors), not by the
        constructor."""
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
        table_loss = float(losses.double().mean())
        if self.init_loss is None:  # the table stands for the pass over the data
            finite_loss_at_center(table_loss)
        elif not math.isclose(table_loss, self.init_loss, rel_tol=1e-4, abs_tol=1e-6):
            return  # the pass over the data is not the mean of the per-sample losses
        # a mean of per-sample terms? On rows spread over the dataset (the first rows alone
        # missed a loss averaged over tokens on data sorted by length)
        total = losses.shape[0]
        rows = min(total, 64 if groups is None else 4)  # samples, or micro-batches
        picked = torch.linspace(0, total - 1, rows, dtype=torch.float64).round().long()
        if groups is not None:
            picked = picked.to(groups.device)
            samples = groups[picked].reshape(-1)
        probe = [t[(picked if groups is None else samples).to(t.device)] for t in tensors]
        picked = picked.to(losses.device)
        with torch.set_grad_enabled(want_grad):
            loss = self.loss(self.reference, probe)
            if not torch.allclose(losses[picked].mean(), loss.detach(), rtol=1e-4, atol=1e-6):
                return  # not a mean of per-sample terms
            if want_grad:
                flat = torch.cat(
                    [g.reshape(-1) for g in self._grads(loss, list(self.center.values()))]
                )
                if not torch.allclose(grads[picked].mean(0), flat, rtol=1e-3, atol=1e-5):
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
