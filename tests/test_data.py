"""Exact checks of :mod:`slt.data`: the ``TensorDataset`` fast path yields what the
``DataLoader`` would, shuffling comes only from the generator passed in, and batches keep
their structure when moved to a device.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from slt.data import BatchStream, batch_size, copied_to, dataset_size

sys.path.insert(0, str(Path(__file__).parent))
from _models import PairDataset  # noqa: E402

CPU = torch.device("cpu")
N = 100  # not a multiple of the batch size: the last batch is partial
BATCH = 32


def tensors(n: int = N):
    """x[i] = i, so a batch says which samples it holds; y and z are aligned with x."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    y = 3 * torch.arange(n)
    z = torch.arange(n, dtype=torch.float64) / 7
    return x, y, z


def indices(batch) -> list[int]:
    x, y, z = batch
    ids = x[:, 0].long()
    assert torch.equal(x[:, 1].long(), ids) and torch.equal(y, 3 * ids)
    assert torch.equal(z, ids.double() / 7)
    return ids.tolist()


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert type(a) is type(b) and len(a) == len(b)
        for s, t in zip(a, b):
            assert s.dtype == t.dtype and s.shape == t.shape and torch.equal(s, t)


# --- the TensorDataset fast path --------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_tensors", [1, 3])
def test_sequential_fast_path_equals_the_loader(drop_last, num_tensors):
    loader = DataLoader(
        TensorDataset(*tensors()[:num_tensors]), batch_size=BATCH, drop_last=drop_last
    )
    stream = BatchStream(loader, CPU)
    assert stream.tensors is not None and stream.shuffle is False  # the fast path is used
    expected = list(loader)
    assert_batches_equal(list(stream.epoch(torch.Generator().manual_seed(0))), expected)
    sizes = [len(b[0]) for b in expected]
    assert sizes == ([BATCH] * 3 if drop_last else [BATCH] * 3 + [N % BATCH])


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_fast_path_is_a_permutation_per_epoch(drop_last):
    loader = DataLoader(
        TensorDataset(*tensors()), batch_size=BATCH, shuffle=True, drop_last=drop_last
    )
    stream = BatchStream(loader, CPU)
    assert stream.tensors is not None and stream.shuffle is True
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(3):
        batches = list(stream.epoch(generator))
        assert all(isinstance(b, list) and len(b) == 3 for b in batches)
        sizes = [len(b[0]) for b in batches]
        assert sizes == ([BATCH] * 3 if drop_last else [BATCH] * 3 + [N % BATCH])
        order = [i for b in batches for i in indices(b)]
        if drop_last:
            assert len(set(order)) == len(order) == N - N % BATCH
        else:
            assert sorted(order) == list(range(N))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # each epoch is reshuffled
    assert orders[0] != sorted(orders[0])


def test_shuffled_fast_path_follows_the_generator():
    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, shuffle=True)
    stream = BatchStream(loader, CPU)

    def order(seed):
        return [i for b in stream.epoch(torch.Generator().manual_seed(seed)) for i in indices(b)]

    torch.manual_seed(0)
    first = order(3)
    torch.manual_seed(1)  # the global generator plays no part
    assert order(3) == first
    assert order(4) != first


def test_fast_path_values_equal_the_loader_when_shuffled():
    # same samples and collated dtypes/shapes as the loader, up to order
    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, shuffle=True)
    mine = list(BatchStream(loader, CPU).epoch(torch.Generator().manual_seed(0)))
    theirs = list(loader)
    for a, b in zip(mine, theirs):
        assert [(t.dtype, t.shape) for t in a] == [(t.dtype, t.shape) for t in b]
    key = lambda batches: sorted(i for b in batches for i in indices(b))  # noqa: E731
    assert key(mine) == key(theirs)


def test_custom_collate_is_not_bypassed():
    def collate(samples):
        x, y, z = torch.utils.data.default_collate(samples)
        return {"x": x, "y": y + 1}

    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, collate_fn=collate)
    stream = BatchStream(loader, CPU)
    assert stream.tensors is None
    got = list(stream.epoch(torch.Generator().manual_seed(0)))
    expected = list(loader)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensor_dataset_subclass_getitem_is_respected():
    class Doubled(TensorDataset):
        def __getitem__(self, i):
            x, y, z = super().__getitem__(i)
            return 2 * x, y, z

    loader = DataLoader(Doubled(*tensors()), batch_size=BATCH)
    got = list(BatchStream(loader, CPU).epoch(torch.Generator().manual_seed(0)))
    assert_batches_equal(got, list(loader))


def test_forever_cycles_epochs_from_one_generator():
    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, shuffle=True)
    stream = BatchStream(loader, CPU)
    gen = torch.Generator().manual_seed(9)
    expected = list(stream.epoch(gen)) + list(stream.epoch(gen)) + list(stream.epoch(gen))[:1]
    forever = stream.forever(torch.Generator().manual_seed(9))
    assert_batches_equal([next(forever) for _ in range(len(expected))], expected)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_chain_indices_are_each_chains_own_epochs(shuffle, drop_last):
    # row c of every (chain, batch) block is chain c's indexed_epoch, epoch after epoch
    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, shuffle=shuffle,
                        drop_last=drop_last)  # fmt: skip
    stream = BatchStream(loader, CPU)
    seeds = [3, 4, 5]
    chains = [stream.forever(torch.Generator().manual_seed(s), indexed=True) for s in seeds]
    together = stream.chain_indices([torch.Generator().manual_seed(s) for s in seeds])
    for _ in range(3 * len(loader) + 1):
        block = next(together)
        for c, chain in enumerate(chains):
            rows = next(chain)[1]
            expected = torch.arange(len(loader.dataset))[rows]  # rows: a slice or indices
            assert torch.equal(block[c], expected)


def test_chain_indices_refuse_an_empty_epoch_and_the_slow_path():
    empty = DataLoader(TensorDataset(torch.zeros(3, 1)), batch_size=4, shuffle=True,
                       drop_last=True)  # fmt: skip
    with pytest.raises(ValueError, match="yielded no batches"):
        next(BatchStream(empty, CPU).chain_indices([torch.Generator()]))
    with pytest.raises(ValueError, match="TensorDataset"):
        next(BatchStream([1, 2], CPU).chain_indices([torch.Generator()]))


# --- other datasets and iterables ---------------------------------------------------------


def test_shuffled_non_tensor_dataset_order_comes_from_the_generator():
    loader = DataLoader(PairDataset(*tensors()), batch_size=BATCH, shuffle=True)
    stream = BatchStream(loader, CPU)
    assert stream.tensors is None and stream.shuffle is True

    def epoch(seed):
        batches = list(stream.epoch(torch.Generator().manual_seed(seed)))
        assert all(isinstance(b, list) and len(b) == 3 for b in batches)
        assert [len(b[0]) for b in batches] == [BATCH] * 3 + [N % BATCH]
        return [i for b in batches for i in indices(b)]

    torch.manual_seed(0)
    first = epoch(5)
    torch.manual_seed(1)
    assert epoch(5) == first
    assert sorted(first) == list(range(N)) and first != list(range(N))
    assert epoch(6) != first
    # successive epochs from one generator differ
    gen = torch.Generator().manual_seed(5)
    a = [i for b in stream.epoch(gen) for i in indices(b)]
    b = [i for b in stream.epoch(gen) for i in indices(b)]
    assert a == first and b != a and sorted(b) == list(range(N))


@pytest.mark.parametrize("drop_last", [False, True])
def test_sequential_non_tensor_dataset_equals_the_loader(drop_last):
    loader = DataLoader(PairDataset(*tensors()), batch_size=BATCH, drop_last=drop_last)
    stream = BatchStream(loader, CPU)
    assert stream.tensors is None and stream.shuffle is False
    assert_batches_equal(list(stream.epoch(torch.Generator().manual_seed(0))), list(loader))


def test_list_of_batches_is_cycled_in_order():
    x, y, z = tensors()
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, N, 40)]  # 40, 40, 20
    stream = BatchStream(batches, CPU)
    assert stream.shuffle is None and stream.tensors is None
    forever = stream.forever(torch.Generator().manual_seed(0))
    got = [next(forever) for _ in range(7)]
    assert_batches_equal(got, [batches[k % 3] for k in range(7)])
    # the generator is not consulted for a plain iterable
    assert_batches_equal(list(stream.epoch(torch.Generator().manual_seed(1))), batches)


def test_empty_loader_raises_in_forever():
    forever = BatchStream([], CPU).forever(torch.Generator())
    with pytest.raises(ValueError, match="loader: yielded no batches"):
        next(forever)


def test_one_shot_iterator_is_refused():
    with pytest.raises(TypeError, match="loader: got a one-shot iterator"):
        BatchStream(iter([torch.zeros(2)]), CPU)
    with pytest.raises(TypeError, match="loader: got a one-shot iterator"):
        BatchStream((t for t in [torch.zeros(2)]), CPU)


def test_dataset_size():
    x, y, z = tensors()
    assert dataset_size(DataLoader(TensorDataset(x), batch_size=BATCH)) == N
    assert dataset_size([x, y]) is None

    class Unsized(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(x)

    assert dataset_size(DataLoader(Unsized(), batch_size=BATCH)) is None


# --- batch_size and copied_to ------------------------------------------------------------


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    name: str


def test_batch_size():
    x, y = torch.zeros(7, 3), torch.zeros(7)
    assert batch_size(x) == 7
    assert batch_size((x, y)) == 7
    assert batch_size([x, y]) == 7
    assert batch_size({"x": x, "y": y}) == 7
    assert batch_size({"id": "abc", "tags": ["a", "b"], "x": x}) == 7  # skips non-tensors
    assert batch_size((3, "s", (None, x))) == 7  # nested, after non-tensors
    assert batch_size(Batch(x, y, "b")) == 7
    assert batch_size(torch.zeros(5)) == 5


def test_batch_size_errors_name_the_loader():
    with pytest.raises(ValueError, match="loader: a batch is a 0-d tensor"):
        batch_size(torch.tensor(1.0))
    for bad in ["abc", 3, (1, "a"), {"a": None}, []]:
        with pytest.raises(TypeError, match="loader: cannot find a tensor"):
            batch_size(bad)


def assert_moved(src, dst, device):
    """``dst`` is ``src`` with every tensor on ``device`` and the same structure."""
    assert type(dst) is type(src)
    if isinstance(src, torch.Tensor):
        assert dst.device.type == device.type and dst.shape == src.shape
        assert dst.dtype == src.dtype
        if device.type == "cpu":  # a copy, not the tensor itself
            assert torch.equal(dst, src) and dst.data_ptr() != src.data_ptr()
    elif isinstance(src, dict):
        assert list(dst) == list(src)
        for k in src:
            assert_moved(src[k], dst[k], device)
    elif isinstance(src, (list, tuple)):
        assert len(dst) == len(src)
        for a, b in zip(src, dst):
            assert_moved(a, b, device)
    else:
        assert dst is src


@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("meta")])
def test_copied_to_keeps_structure(device):
    x, y = torch.randn(4, 2), torch.arange(4)
    batch = Batch(x, y, "b")
    moved = copied_to(batch, device)
    assert isinstance(moved, Batch) and moved._fields == ("x", "y", "name")
    assert_moved(batch, moved, device)
    for nested in [
        x,
        (x, y),
        [x, y],
        {"x": x, "y": y, "meta": {"ids": [1, 2]}},
        ([x, (y, "tag")], {"inner": batch}),
        "no tensors",
        None,
    ]:
        assert_moved(nested, copied_to(nested, device), device)


def test_fast_path_on_meta_device():
    # the TensorDataset tensors are moved once, and batches come out on the device
    loader = DataLoader(TensorDataset(*tensors()), batch_size=BATCH, shuffle=True)
    stream = BatchStream(loader, torch.device("meta"))
    batches = list(stream.epoch(torch.Generator().manual_seed(0)))
    assert [b[0].shape[0] for b in batches] == [BATCH] * 3 + [N % BATCH]
    assert all(t.device.type == "meta" for b in batches for t in b)
