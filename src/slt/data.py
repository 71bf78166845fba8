"""Minibatches for sampling: one reproducible stream per chain, never the global RNG.

The user passes any re-iterable of batches. For a ``DataLoader`` we draw the shuffling
from the chain's own generator (so chains do not depend on each other or on the global
random state); for a ``DataLoader`` over a ``TensorDataset`` with the default collate,
batches are sliced straight from the tensors, which is what the loader would produce but
without per-sample collation (and copied, so that a model that edits its input in place
cannot edit the data). Any other loader is iterated on a global random state of its own,
seeded from the chain's generator, so that a sampler's order, a ``DataLoader``'s worker
seed or an augmentation in the dataset differ between chains and epochs, repeat with the
seed, and leave the caller's global state alone; a generator the loader holds (a sampler's
``generator=``) is replaced by a private one for the pass, never advanced.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
    WeightedRandomSampler,
)


def copied_to(batch: Any, device: torch.device) -> Any:
    """A (nested) batch with a copy of every tensor on ``device``: a model that edits its
    input in place then edits the copy, not the user's data (a list of batches, or a
    dataset that hands out its own tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True, copy=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(copied_to(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(copied_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: copied_to(v, device) for k, v in batch.items()}
    return batch


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the leading dimension of its first tensor, which
    its other tensors (of at least one dimension) must share: single samples (a
    ``DataLoader(batch_size=None)``, a list of ``(x_i, y_i)``) counted x's features."""
    size = _leading(batch)
    if not isinstance(batch, torch.Tensor):
        others = {t.shape[0] for t in tensors_in(batch) if t.dim() > 0}
        if len(others) > 1:
            raise ValueError(
                f"loader: a batch's tensors have leading dimensions {sorted(others)}; batches "
                "need a leading sample dimension that all their tensors share (single "
                "samples, as DataLoader(batch_size=None) or a list of (x_i, y_i) yields, have "
                "none): batch them, e.g. DataLoader(dataset, batch_size=..., shuffle=True)"
            )
    return size


def tensors_in(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) batch: a tensor, or lists, tuples and dicts of them."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from tensors_in(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors_in(value)


def _leading(batch: Any) -> int:
    """The leading dimension of ``batch``'s first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("loader: a batch is a 0-d tensor; batches need a sample dimension")
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, Iterable) and not isinstance(batch, (str, bytes)):
        for item in items:
            try:
                return _leading(item)
            except TypeError:
                continue
    raise TypeError(f"loader: cannot find a tensor in a batch of type {type(batch).__name__}")


def dataset_size(loader: Iterable) -> int | None:
    """The samples an epoch of ``loader`` draws, where it says: ``len(loader.sampler)`` for
    a ``DataLoader`` batching its own sampler over a map-style dataset (the subset a
    ``SubsetRandomSampler`` picks), else ``len(loader.dataset)``; ``None`` if not sized."""
    dataset = getattr(loader, "dataset", None)
    if (
        isinstance(loader, DataLoader)
        and not isinstance(dataset, IterableDataset)
        and (loader.batch_sampler is None or getattr(loader.batch_sampler, "sampler", None)
             is loader.sampler)
    ):  # fmt: skip
        try:
            return len(loader.sampler)
        except TypeError:
            pass
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _held_generator(obj) -> bool:
    return isinstance(getattr(obj, "generator", None), torch.Generator)


def _private_loader(loader: DataLoader, seed: int, shuffle: bool | None, drop_last: bool):
    """``loader`` as one that draws its randomness from ``seed`` and drops its short last
    batch only if ``drop_last``: a standard sampler rebuilt from ``seed``; a sampler or
    batch sampler holding a ``generator`` copied with a private one; the loader itself
    where nothing needs changing."""
    common = dict(
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
        prefetch_factor=loader.prefetch_factor,
        timeout=loader.timeout,
    )
    generator = torch.Generator().manual_seed(seed)
    if shuffle is not None:  # a standard sampler: its order from our generator
        return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=shuffle,
                          generator=generator, drop_last=drop_last, **common)  # fmt: skip
    own = None if loader.generator is None else generator  # the workers' base seed
    if isinstance(loader.dataset, IterableDataset):
        if own is None and loader.drop_last == drop_last:
            return loader
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=drop_last,
                          generator=own, **common)  # fmt: skip
    sampler, batches = loader.sampler, loader.batch_sampler
    changed = own is not None
    if _held_generator(sampler):
        sampler = copy.copy(sampler)
        sampler.generator = torch.Generator().manual_seed(seed + 1)
        changed = True
    if type(batches) is BatchSampler:  # the loader's own, or given as batch_sampler=
        inner = sampler if batches.sampler is loader.sampler else batches.sampler
        if inner is batches.sampler and inner is not loader.sampler and _held_generator(inner):
            inner = copy.copy(inner)
            inner.generator = torch.Generator().manual_seed(seed + 1)
            changed = True
        if changed or batches.drop_last != drop_last:  # the pass at w* keeps a short batch
            batches = BatchSampler(inner, batches.batch_size, drop_last)
            changed = True
    elif _held_generator(batches):
        batches = copy.copy(batches)
        batches.generator = torch.Generator().manual_seed(seed + 2)
        changed = True
    elif _held_generator(getattr(batches, "sampler", None)):  # batch_sampler=BatchSampler(...)
        inner = copy.copy(batches.sampler)
        inner.generator = torch.Generator().manual_seed(seed + 1)
        batches = copy.copy(batches)
        batches.sampler = inner
        changed = True
    if not changed:
        return loader
    if batches is None:
        return DataLoader(loader.dataset, batch_size=None, sampler=sampler, generator=own,
                          **common)  # fmt: skip
    return DataLoader(loader.dataset, batch_sampler=batches, generator=own, **common)


def _check_sampler(loader: DataLoader) -> None:
    """Refuse a sampler that does not draw every sample once an epoch (with replacement, or
    ``num_samples`` other than the dataset's size): L_n(w*) over "one pass" would be one
    random resample, and the control variate centred on it (λ̂ 3.0 against 1.5)."""
    batches = loader.batch_sampler
    for sampler in (loader.sampler, getattr(batches, "sampler", None)):
        if isinstance(sampler, RandomSampler):
            size = len(sampler.data_source)
            resamples = sampler.replacement or (sampler._num_samples not in (None, size))
        elif isinstance(sampler, WeightedRandomSampler):
            resamples = sampler.replacement or sampler.num_samples != len(sampler.weights)
        else:
            continue
        if resamples:
            raise ValueError(
                f"loader: its sampler ({type(sampler).__name__}, replacement="
                f"{sampler.replacement}) does not draw every sample once per epoch, so L_n(w*) "
                "over one pass would be a random resample and λ̂ biased; use shuffle=True "
                "(every sample once an epoch), or a SubsetRandomSampler for a subset"
            )


def _shuffles(loader: DataLoader) -> bool | None:
    """True/False for a loader with a standard random/sequential sampler that it batches
    itself (``batch_size=``), else None (``batch_sampler=``, a custom sampler, ...)."""
    batches = loader.batch_sampler
    if (batches is None or type(batches).__name__ != "BatchSampler"
            or batches.sampler is not loader.sampler or loader.batch_size is None):  # fmt: skip
        return None
    if isinstance(loader.sampler, RandomSampler):
        if loader.sampler.replacement or loader.sampler._num_samples is not None:
            return None
        return True
    if isinstance(loader.sampler, SequentialSampler):
        return False
    return None


_END = object()
_NO_BATCHES = (
    "loader: yielded no batches (is the dataset empty, or does the loader drop its last "
    "batch, drop_last=True, with batch_size larger than the dataset?)"
)


class NotOneBatch(ValueError):
    """The loader yields more than one batch per epoch where the whole dataset was needed."""


class BatchStream:
    """Epochs of minibatches from ``loader`` on ``device``, shuffled by a given generator."""

    def __init__(self, loader: Iterable, device: torch.device):
        if isinstance(loader, Dataset) and not isinstance(loader, IterableDataset):
            raise TypeError(
                f"loader: got a dataset ({type(loader).__name__}), not batches of it; wrap it "
                "in torch.utils.data.DataLoader(dataset, batch_size=..., shuffle=True)"
            )
        try:
            one_shot = not isinstance(loader, DataLoader) and iter(loader) is loader
        except TypeError:
            raise TypeError(
                f"loader must be a re-iterable of batches such as a DataLoader or a list, got "
                f"{type(loader).__name__}"
            ) from None
        if one_shot:
            raise TypeError(
                "loader: got a one-shot iterator; pass a re-iterable such as a DataLoader or a list"
            )
        if isinstance(loader, DataLoader):
            _check_sampler(loader)
        self.loader = loader
        self.device = device
        self.shuffle = _shuffles(loader) if isinstance(loader, DataLoader) else None
        self.tensors: tuple[torch.Tensor, ...] | None = None
        # (n/m, m) sample indices: with micro-batches (:meth:`group`), an epoch's order is
        # whole groups in a shuffled order
        self.groups: torch.Tensor | None = None
        if (
            self.shuffle is not None
            and type(loader.dataset) is TensorDataset  # a subclass may override __getitem__
            and getattr(loader.collate_fn, "__name__", "") == "default_collate"
        ):
            self.tensors = tuple(t.to(device) for t in loader.dataset.tensors)

    def group(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """Draw every batch from now on as ``batch_size / size`` whole micro-batches of
        ``size`` samples: a random partition of the samples drawn once from ``generator``
        (consecutive ones if the loader does not shuffle), its groups shuffled each epoch.
        Fast path only; ``size`` must divide the number of samples and the batch size.
        Returns the (n/size, size) partition."""
        if self.tensors is None:
            raise ValueError(
                "microbatch: micro-batches need a DataLoader over a TensorDataset with its own "
                "sampler (shuffle=True or False, no sampler= or batch_sampler=) and the default "
                "collate; use microbatch=None for this loader"
            )
        n, bs = self.tensors[0].shape[0], self.loader.batch_size
        if n % size or bs % size:
            raise ValueError(f"microbatch must divide the number of samples ({n}) and the "
                             f"batch size ({bs}); got {size}")  # fmt: skip
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        self.groups = order.reshape(-1, size).to(self.device)
        return self.groups

    def _order(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch's order of the samples, drawn from ``generator``: a permutation, or
        with micro-batches the groups' samples in a permuted order of the groups."""
        if self.groups is None:
            return torch.randperm(self.tensors[0].shape[0], generator=generator)
        groups = torch.randperm(self.groups.shape[0], generator=generator)
        return self.groups[groups.to(self.device)].reshape(-1)

    def _batch_starts(self, complete: bool = False) -> range:
        """The first row of each batch of an epoch on the fast path (a short last batch
        unless the loader drops it and the pass need not be ``complete``)."""
        n, bs = self.tensors[0].shape[0], self.loader.batch_size
        return range(0, n - n % bs if self.loader.drop_last and not complete else n, bs)

    def indexed_epoch(
        self, generator: torch.Generator, *, complete: bool = False
    ) -> Iterator[tuple[Any, Any]]:
        """One pass as (batch, sample indices); the indices are None off the fast path.
        ``complete``: every sample, whether or not the loader drops a short last batch."""
        if self.tensors is None:
            for batch in self.epoch(generator, complete=complete):
                yield batch, None
            return
        bs = self.loader.batch_size
        # the epoch's order moved to the device once, not a batch's rows at every step (a
        # blocking host-to-device copy each step would wait for the device's queue)
        order = self._order(generator).to(self.device) if self.shuffle else None
        for start in self._batch_starts(complete):
            if order is None:  # a copy: a view would let the model edit the user's tensors
                rows = slice(start, start + bs)
                yield [t[rows].clone() for t in self.tensors], rows
            else:
                rows = order[start : start + bs]
                yield [t[rows] for t in self.tensors], rows

    def chain_indices(self, generators: list[torch.Generator]) -> Iterator[torch.Tensor]:
        """(chain, batch) sample indices, step after step, forever, for chains that each
        draw their epochs' orders from their own generator: row c is what
        :meth:`indexed_epoch` gives ``generators[c]``, epoch after epoch, so the chains of
        a batched step see the batches they would see one at a time. Fast path only."""
        if self.tensors is None:
            raise ValueError("chain_indices needs a DataLoader over a TensorDataset")
        n = self.tensors[0].shape[0]
        bs = self.loader.batch_size
        starts = self._batch_starts()
        if not starts:
            raise ValueError(_NO_BATCHES)
        while True:
            if self.shuffle:
                order = torch.stack([self._order(g) for g in generators])
            else:
                order = torch.arange(n).expand(len(generators), n)
            order = order.to(self.device)
            for start in starts:
                yield order[:, start : start + bs]

    def epoch(self, generator: torch.Generator, *, complete: bool = False) -> Iterator[Any]:
        """One pass over the data, in an order drawn from ``generator`` when shuffling;
        ``complete``: every sample, whether or not the loader drops a short last batch."""
        if self.tensors is not None:
            for batch, _ in self.indexed_epoch(generator, complete=complete):
                yield batch
            return
        seed = int(torch.randint(2**62, (), generator=generator))
        loader = self.loader
        if isinstance(loader, DataLoader):
            drop_last = loader.drop_last and not complete
            # a complete pass (at w*, a per-sample record) in the dataset's order: the sum
            # does not care, and a record's columns are then the dataset's samples
            shuffle = False if complete and self.shuffle else self.shuffle
            loader = _private_loader(loader, seed, shuffle, drop_last)
        # What the loader draws from torch's global generator (a sampler's order, the
        # workers' base seed, a random augmentation) it draws from a state of its own,
        # seeded from ``generator`` and carried from batch to batch. (numpy's and Python's
        # global states are private to the estimate, :func:`slt._globals.private`, but
        # shared by its chains: carrying them per batch, as torch's, cost ~0.45 ms a batch)
        state = torch.Generator().manual_seed(seed).get_state()
        batches = None
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)
                if batches is None:
                    batches = iter(loader)
                batch = next(batches, _END)
                state = torch.get_rng_state()
            if batch is _END:
                return
            yield copied_to(batch, self.device)

    def complete_pass(self) -> Iterator[Any]:
        """Every sample once, short last batch included: the passes over the data at w*.
        In the dataset's order for a ``DataLoader`` with a standard sampler (shuffled or
        not), else in the loader's (a fixed one if it shuffles)."""
        return self.epoch(torch.Generator().manual_seed(0), complete=True)

    def full_batch(self) -> Any:
        """The whole dataset as one batch on ``device``, for samplers that need it every step.

        For a ``DataLoader`` over a plain ``TensorDataset`` (the fast path above) it is the
        full tensors, whatever the loader's batch size; otherwise the loader must yield
        exactly one batch per epoch, and that batch is returned. Raises ``NotOneBatch`` (a
        ``ValueError``) when it yields more, ``ValueError`` when it yields none.
        """
        if self.tensors is not None:  # copies: the model must not edit the user's tensors
            return [t.clone() for t in self.tensors]
        batches = self.complete_pass()
        first = next(batches, _END)
        if first is _END:
            raise ValueError("loader: yielded no batches (is the dataset empty?)")
        if next(batches, _END) is not _END:
            try:
                count = f"{len(self.loader)} batches"
            except TypeError:
                count = "more than one batch"
            raise NotOneBatch(f"loader yields {count} per epoch, not one")
        return first

    def forever(self, generator: torch.Generator, *, indexed: bool = False) -> Iterator[Any]:
        """Epoch after epoch (of ``(batch, indices)`` pairs if ``indexed``); raises
        ``ValueError`` if the loader yields nothing."""
        while True:
            empty = True
            epoch = self.indexed_epoch(generator) if indexed else self.epoch(generator)
            for item in epoch:
                empty = False
                yield item
            if empty:
                raise ValueError(_NO_BATCHES)
