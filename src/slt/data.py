"""Minibatches for sampling: one reproducible stream per chain, never the global RNG.

The user passes any re-iterable of batches. For a ``DataLoader`` we draw the shuffling
from the chain's own generator (so chains do not depend on each other or on the global
random state); for a ``DataLoader`` over a ``TensorDataset`` with the default collate,
batches are sliced straight from the tensors, which is what the loader would produce but
without per-sample collation. Any other iterable is used as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("loader: a batch is a 0-d tensor; batches need a sample dimension")
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(items, Iterable) and not isinstance(batch, (str, bytes)):
        for item in items:
            try:
                return batch_size(item)
            except TypeError:
                continue
    raise TypeError(f"loader: cannot find a tensor in a batch of type {type(batch).__name__}")


def dataset_size(loader: Iterable) -> int | None:
    """``len(loader.dataset)`` when the loader has a sized dataset, else ``None``."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _shuffles(loader: DataLoader) -> bool | None:
    """True/False for a loader with a standard random/sequential sampler, else None."""
    if loader.batch_sampler is None or type(loader.batch_sampler).__name__ != "BatchSampler":
        return None
    if isinstance(loader.sampler, RandomSampler):
        if loader.sampler.replacement or loader.sampler._num_samples is not None:
            return None
        return True
    if isinstance(loader.sampler, SequentialSampler):
        return False
    return None


_END = object()


class NotOneBatch(ValueError):
    """The loader yields more than one batch per epoch where the whole dataset was needed."""


class BatchStream:
    """Epochs of minibatches from ``loader`` on ``device``, shuffled by a given generator."""

    def __init__(self, loader: Iterable, device: torch.device):
        if not isinstance(loader, DataLoader) and iter(loader) is loader:
            raise TypeError(
                "loader: got a one-shot iterator; pass a re-iterable such as a DataLoader or a list"
            )
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
            raise ValueError("micro-batches need a DataLoader over a TensorDataset")
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

    def _batch_starts(self) -> range:
        """The first row of each batch of an epoch on the fast path (a short last batch
        unless the loader drops it)."""
        n, bs = self.tensors[0].shape[0], self.loader.batch_size
        return range(0, n - n % bs if self.loader.drop_last else n, bs)

    def indexed_epoch(self, generator: torch.Generator) -> Iterator[tuple[Any, Any]]:
        """One pass as (batch, sample indices); the indices are None off the fast path."""
        if self.tensors is None:
            for batch in self.epoch(generator):
                yield batch, None
            return
        bs = self.loader.batch_size
        order = self._order(generator) if self.shuffle else None
        for start in self._batch_starts():
            if order is None:
                rows = slice(start, start + bs)
            else:
                rows = order[start : start + bs].to(self.device)
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
            raise ValueError("loader: yielded no batches (is the dataset empty?)")
        while True:
            if self.shuffle:
                order = torch.stack([self._order(g) for g in generators])
            else:
                order = torch.arange(n).expand(len(generators), n)
            order = order.to(self.device)
            for start in starts:
                yield order[:, start : start + bs]

    def epoch(self, generator: torch.Generator) -> Iterator[Any]:
        """One pass over the data, in an order drawn from ``generator`` when shuffling."""
        loader = self.loader
        if self.tensors is not None:
            for batch, _ in self.indexed_epoch(generator):
                yield batch
            return
        if self.shuffle is not None:  # rebuilt so that its seed comes from our generator
            seed = int(torch.randint(2**62, (), generator=generator))
            loader = DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                shuffle=self.shuffle,
                generator=torch.Generator().manual_seed(seed),
                collate_fn=loader.collate_fn,
                drop_last=loader.drop_last,
                num_workers=loader.num_workers,
                pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context,
                persistent_workers=loader.persistent_workers,
                prefetch_factor=loader.prefetch_factor,
                timeout=loader.timeout,
            )
            yield from (to_device(batch, self.device) for batch in loader)
            return
        # A loader we cannot rebuild (custom sampler, plain iterable) is used as given. A
        # DataLoader draws its base seed, and a sampler usually its whole order, from the
        # global generator when the iteration starts: do that on a forked global state.
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
            first = next(batches, _END)
        if first is _END:
            return
        yield to_device(first, self.device)
        for batch in batches:
            yield to_device(batch, self.device)

    def full_batch(self) -> Any:
        """The whole dataset as one batch on ``device``, for samplers that need it every step.

        For a ``DataLoader`` over a plain ``TensorDataset`` (the fast path above) it is the
        full tensors, whatever the loader's batch size; otherwise the loader must yield
        exactly one batch per epoch, and that batch is returned. Raises ``NotOneBatch`` (a
        ``ValueError``) when it yields more, ``ValueError`` when it yields none.
        """
        if self.tensors is not None:
            return list(self.tensors)
        batches = self.epoch(torch.Generator().manual_seed(0))
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
                raise ValueError("loader: yielded no batches (is the dataset empty?)")
