"""The loss adapters against reference implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slt


def test_gaussian_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)
    for sigma in (0.3, 1.0, 2.5):
        with torch.no_grad():
            ref = -torch.distributions.Normal(model(x), sigma).log_prob(y).sum(1).mean()
            got = slt.gaussian_nll(sigma)(model, (x, y))
        torch.testing.assert_close(got, ref)


def test_gaussian_nll_one_dimensional_targets():
    model = torch.nn.Linear(1, 1)
    x, y = torch.randn(8, 1), torch.randn(8)  # y without a trailing dimension
    with torch.no_grad():
        got = slt.gaussian_nll(1.0)(lambda v: model(v).squeeze(1), (x, y))
        ref = -torch.distributions.Normal(model(x).squeeze(1), 1.0).log_prob(y).mean()
    torch.testing.assert_close(got, ref)


def test_supervised_cross_entropy_is_mean_nll():
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4, generator=g), torch.randint(3, (10,), generator=g)
    with torch.no_grad():
        got = slt.supervised(F.cross_entropy)(model, (x, y))
        ref = -torch.log_softmax(model(x), 1)[torch.arange(10), y].mean()
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("sigma", [0, -1.0, math.nan, math.inf, "1"])
def test_gaussian_nll_rejects_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        slt.gaussian_nll(sigma)


def test_supervised_takes_a_loss_module_and_a_criterion_without_reduction():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    batch = (torch.randn(6, 3), torch.randint(0, 4, (6,)))
    expected = F.cross_entropy(model(batch[0]), batch[1], reduction="none")
    for criterion in (torch.nn.CrossEntropyLoss(), lambda out, y: F.cross_entropy(out, y)):
        loss_fn = slt.supervised(criterion)
        torch.testing.assert_close(loss_fn.per_sample(model, batch), expected)
        torch.testing.assert_close(loss_fn(model, batch), expected.mean())
    with pytest.raises(ValueError, match="reduction='sum'"):
        slt.supervised(torch.nn.CrossEntropyLoss(reduction="sum"))


def test_a_class_weighted_criterion_is_warned_and_per_sample_records_refuse_it(tmp_path):
    # CrossEntropyLoss(weight=...) averages Σ w_y ℓ / Σ w_y: its per-sample terms do not
    # average to it, and the recorded rows were on another scale (0.21-0.39 against 0.14)
    torch.manual_seed(0)
    x, y = torch.randn(120, 4), torch.randint(0, 3, (120,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=40)
    model = torch.nn.Linear(4, 3)
    with pytest.warns(UserWarning, match="has a class weight"):
        loss_fn = slt.supervised(torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 0.2])))
    with pytest.raises(ValueError, match=r"at w\* their mean is .* not the plain mean"):
        slt.estimate_llc(model, loader, loss_fn, num_chains=1, num_draws=4, num_burnin=1,
                         record="per_sample", record_path=tmp_path / "ps.h5",
                         progress=False)  # fmt: skip
    assert not list(tmp_path.iterdir())  # refused before the file was made

    def plain(m, b):  # the plain mean of weighted per-sample terms is what slt can take
        w = torch.tensor([1.0, 5.0, 0.2])
        return F.cross_entropy(m(b[0]), b[1], weight=w, reduction="none").mean()

    res = slt.estimate_llc(model, loader, plain, num_chains=1, num_draws=4, num_burnin=1,
                           record="per_sample", record_path=tmp_path / "ok.h5",
                           progress=False)  # fmt: skip
    assert np.isfinite(res.llc)


def test_bare_tensor_batches_are_named():
    model = torch.nn.Linear(3, 1)
    for loss_fn in (slt.supervised(F.mse_loss), slt.gaussian_nll(1.0)):
        with pytest.raises(
            TypeError, match=r"take \(x, y\) batches, got a tensor of shape \(8, 3\)"
        ):
            loss_fn(model, torch.randn(8, 3))


def test_a_model_returning_a_tuple_is_named():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x), x

    batch = (torch.randn(8, 3), torch.randn(8, 1))
    for loss_fn in (slt.supervised(F.mse_loss), slt.gaussian_nll(1.0)):
        with pytest.raises(TypeError, match="need a model that returns a tensor, got tuple"):
            loss_fn(Pair(), batch)
