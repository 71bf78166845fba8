"""The loss adapters against reference implementations."""

import math

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
