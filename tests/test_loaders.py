"""Loaders slt cannot slice itself (custom samplers, datasets that draw randomness,
``drop_last``), data the model edits in place, and inputs that are not loaders: each
chain still gets its own batches, L_n(w*) covers every sample, the same seed gives the
same numbers, and nothing of the caller's (data, sampler generator, global RNG) changes."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import slt
from slt.data import BatchStream, dataset_size

sys.path.insert(0, str(Path(__file__).parent))
from _models import PairDataset  # noqa: E402

CPU = torch.device("cpu")
KW = dict(step_size=1e-4, num_chains=3, num_draws=12, num_burnin=0, progress=False)


def regression(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [0.5], [-1.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        ones = torch.cat([x, torch.ones(n, 1)], 1)
        solution = torch.linalg.lstsq(ones, y).solution
        model.weight.copy_(solution[:-1].T)
        model.bias.copy_(solution[-1])
    return model, x, y


def full_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(slt.gaussian_nll(0.5)(model, (x, y)))


def test_a_subset_sampler_gives_each_chain_and_epoch_its_own_batches_and_n_the_subset():
    model, x, y = regression(1000)
    train = torch.arange(200)
    own = torch.Generator().manual_seed(7)
    loader = DataLoader(TensorDataset(x, y), batch_size=50,
                        sampler=SubsetRandomSampler(train, generator=own))  # fmt: skip
    before, global_before = own.get_state(), torch.get_rng_state()
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), control_variate="loss", **KW)
    c = res.trace_at_center  # L_B(w*) at each draw: a function of the batch alone
    assert not np.array_equal(c[0], c[1]) and not np.array_equal(c[1], c[2])
    assert not np.array_equal(c[0, :4], c[0, 4:8])  # 4 batches an epoch: reshuffled
    assert torch.equal(own.get_state(), before)  # the sampler's generator is not advanced
    assert torch.equal(torch.get_rng_state(), global_before)
    # n is the subset L_n(w*) was taken over, not len(dataset)
    assert res.n == 200 == dataset_size(loader)
    assert res.nbeta == pytest.approx(200 / math.log(200))
    assert res.init_loss == pytest.approx(full_loss(model, x[train], y[train]), rel=1e-6)
    again = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), control_variate="loss", **KW)
    assert np.array_equal(again.trace, res.trace)


class Augmented(Dataset):
    """Map-style, with a random augmentation drawn from torch's global generator."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(3), self.y[i]


class AlwaysDropout(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.nn.functional.dropout(x, 0.1, training=True))


@pytest.mark.parametrize("case", ["augmented, shuffled", "augmented", "dropout in the model"])
def test_what_user_code_draws_from_the_global_rng_repeats_with_the_seed(case):
    model, x, y = regression()
    if case.startswith("augmented"):
        data = Augmented(x, y)
        loader = DataLoader(data, batch_size=64, shuffle=case.endswith("shuffled"))
    else:
        model = AlwaysDropout(model)
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    traces = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), chain_method="loop", **KW)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's state is untouched
        traces.append(res.trace)
    assert np.array_equal(*traces)  # and the numbers do not depend on it


@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_last_still_takes_L_n_at_w_star_over_every_sample(shuffle):
    model, x, y = regression(250)  # 250 = 3 × 64 + 58: the short batch is dropped
    data = TensorDataset(x, y)
    kept = DataLoader(data, batch_size=64, shuffle=shuffle)
    dropped = DataLoader(data, batch_size=64, shuffle=shuffle, drop_last=True)
    augmented = DataLoader(Augmented(x, y), batch_size=64, drop_last=True)  # the slow path
    exact = full_loss(model, x, y)
    for loader in (kept, dropped):
        res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), **KW)
        assert res.n == 250 and res.init_loss == pytest.approx(exact, rel=1e-6)
    res = slt.estimate_llc(model, augmented, slt.gaussian_nll(0.5), **KW)
    assert res.n == 250


class InPlace(torch.nn.Module):
    """Scales its input in place: a model's bug that must not reach the user's data."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        x.mul_(2.0)
        return self.inner(x / 2.0)


@pytest.mark.parametrize(
    ("shuffle", "options"),
    [(False, {}), (True, {}), (True, {"sampler": "mala"}), (False, {"chain_method": "vmap"})],
)
def test_a_model_that_edits_its_input_does_not_edit_the_data(shuffle, options):
    model, x, y = regression()
    x0 = x.clone()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle)
    slt.estimate_llc(InPlace(model), loader, slt.gaussian_nll(0.5), **(KW | options))
    assert torch.equal(x, x0)


def test_what_is_not_a_loader_or_a_loss_is_named():
    model, x, y = regression()
    loss = slt.gaussian_nll(0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    with pytest.raises(TypeError, match=r"loader: got a dataset \(TensorDataset\).*DataLoader"):
        slt.estimate_llc(model, TensorDataset(x, y), loss, **KW)
    with pytest.raises(TypeError, match="loader must be a re-iterable of batches.*NoneType"):
        slt.estimate_llc(model, None, loss, **KW)
    with pytest.raises(TypeError, match="params must be a name, a glob pattern.*got 5"):
        slt.estimate_llc(model, loader, loss, params=5, **KW)
    with pytest.raises(ValueError, match="step_size must be a number > 0 or \"auto\", got 'Auto'"):
        slt.estimate_llc(model, loader, loss, **(KW | {"step_size": "Auto"}))
    for method in ("loop", "auto"):
        with pytest.raises(ValueError, match="loss_fn returned a loss that does not depend"):
            slt.estimate_llc(model, loader, lambda m, b: loss(m, b).detach(),
                             chain_method=method, **KW)  # fmt: skip


def test_a_complete_pass_includes_the_short_batch_the_loader_drops():
    x = torch.arange(10.0).unsqueeze(1)
    for loader in (
        DataLoader(TensorDataset(x), batch_size=4, drop_last=True),
        DataLoader(Augmented(x.repeat(1, 3), x), batch_size=4, drop_last=True),
    ):
        stream = BatchStream(loader, CPU)
        assert sum(len(b[0]) for b in stream.epoch(torch.Generator().manual_seed(0))) == 8
        assert sum(len(b[0]) for b in stream.complete_pass()) == 10


class NumpyAugmented(Augmented):
    """A random augmentation drawn from numpy's and Python's global generators."""

    def __getitem__(self, i):
        shift = 0.01 * np.random.randn() + 0.01 * random.random()  # noqa: NPY002
        return self.x[i] + shift, self.y[i]


def test_what_a_dataset_draws_from_numpy_or_random_repeats_with_the_seed():
    model, x, y = regression()
    loader = DataLoader(NumpyAugmented(x, y), batch_size=64, shuffle=True)
    traces = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)  # noqa: NPY002
        random.seed(global_seed)
        states = np.random.get_state(), random.getstate()  # noqa: NPY002
        res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), chain_method="loop", **KW)
        after = np.random.get_state(), random.getstate()  # noqa: NPY002
        assert all(np.array_equal(a, b) for a, b in zip(states[0], after[0], strict=True))
        assert states[1] == after[1]  # the caller's states are untouched
        traces.append(res.trace)
    assert np.array_equal(*traces)  # and the numbers do not depend on them
    assert not np.array_equal(traces[0][0], traces[0][1])  # each chain its own draws


@pytest.mark.parametrize("dataset", [TensorDataset, PairDataset])
def test_a_loader_of_batch_sampler_runs_and_leaves_its_generator_alone(dataset):
    model, x, y = regression()
    own = torch.Generator().manual_seed(7)
    batches = BatchSampler(RandomSampler(range(256), generator=own), 64, drop_last=False)
    loader = DataLoader(dataset(x, y), batch_sampler=batches)
    before = own.get_state()
    res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), control_variate="loss", **KW)
    assert torch.equal(own.get_state(), before)
    assert res.n == 256 and res.init_loss == pytest.approx(full_loss(model, x, y), rel=1e-6)
    c = res.trace_at_center
    assert not np.array_equal(c[0], c[1])  # each chain its own order
    again = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), control_variate="loss", **KW)
    assert np.array_equal(again.trace, res.trace)


@pytest.mark.parametrize("one_batch", [False, True])
def test_a_model_that_edits_its_input_does_not_edit_a_list_of_batches(one_batch):
    model, x, y = regression()
    x0 = x.clone()
    batches = [(x, y)] if one_batch else [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]
    options = {"sampler": "mala"} if one_batch else {}
    slt.estimate_llc(InPlace(model), batches, slt.gaussian_nll(0.5), **(KW | options))
    assert torch.equal(x, x0)


def test_loaders_that_resample_or_yield_single_samples_are_refused():
    # L_n(w*) over "one pass" of a resampling sampler was one random resample (λ̂ 3.0
    # against 1.5), and single samples counted x's features as n (1,536 for 512)
    model, x, y = regression()
    data = TensorDataset(x, y)
    loss_fn = slt.gaussian_nll(0.5)
    for sampler in (RandomSampler(data, replacement=True), RandomSampler(data, num_samples=100),
                    WeightedRandomSampler(torch.ones(len(data)), len(data))):  # fmt: skip
        with pytest.raises(ValueError, match="does not draw every sample once per epoch"):
            slt.estimate_llc(model, DataLoader(data, batch_size=32, sampler=sampler), loss_fn,
                             **KW)  # fmt: skip
    whole = WeightedRandomSampler(torch.ones(len(data)), len(data), replacement=False)
    BatchStream(DataLoader(data, batch_size=32, sampler=whole), CPU)  # every sample once: fine
    for single in (DataLoader(data, batch_size=None), [(x[i], y[i]) for i in range(len(x))]):
        with pytest.raises(ValueError, match=r"leading dimensions \[1, 3\]"):
            slt.estimate_llc(model, single, loss_fn, **KW)


def test_a_batch_sampler_that_drops_its_last_batch_still_gives_L_n_over_every_sample():
    # batch_sampler=BatchSampler(..., drop_last=True): the pass at w* dropped it (n 448)
    model, x, y = regression(250)
    data = TensorDataset(x, y)
    for inner in (RandomSampler(data), torch.utils.data.SequentialSampler(data)):
        loader = DataLoader(data, batch_sampler=BatchSampler(inner, 64, drop_last=True))
        res = slt.estimate_llc(model, loader, slt.gaussian_nll(0.5), **KW)
        assert res.n == 250
        assert res.init_loss == pytest.approx(full_loss(model, x, y), rel=1e-6)
