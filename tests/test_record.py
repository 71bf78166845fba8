"""record="per_sample": per-sample losses streamed to a file, and their running statistics."""

import h5py
import numpy as np
import pytest
import torch

import slt
from slt import zoo
from slt.losses import per_sample
from slt.record import PerSampleRecorder
from slt.sampling import build_posterior


def test_per_sample_rows_match_the_full_batch_loss(tmp_path):
    # MALA sees the full data at every step, so trace[c, j] = L_n(w_j): the mean of the
    # recorded row for draw j must equal it.
    case = zoo.regular(3, n=200)
    path = tmp_path / "ps.h5"
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, sampler="mala",
                           step_size=1e-3, num_chains=2, num_draws=30, num_burnin=5,
                           record="per_sample", record_every=3, record_path=str(path),
                           progress=False)  # fmt: skip
    assert res.per_sample_path == str(path)
    with h5py.File(path) as f:
        rows = f["per_sample_loss"][:]
    assert rows.shape == (2, 10, 200)
    np.testing.assert_allclose(rows.mean(axis=2), res.trace[:, ::3], rtol=1e-6)


def test_generic_per_sample_matches_the_adapter():
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(7, 3), torch.randn(7, 2))
    exact = slt.gaussian_nll(0.7)

    def plain(m, b):  # no .per_sample: vmap over samples
        return exact(m, b)

    torch.testing.assert_close(per_sample(plain)(model, batch), exact.per_sample(model, batch))


def test_running_statistics_equal_the_recorded_rows(tmp_path):
    case = zoo.regular(2, n=128)
    posterior = build_posterior(
        case.model, case.loader(32), case.loss_fn, n=None, nbeta=None, localization=1.0,
        control_variate="gradient", sampler="sgld",
    )  # fmt: skip
    path = tmp_path / "ps.h5"
    recorder = PerSampleRecorder(posterior, num_chains=2, start=10, every=5, path=path,
                                 num_draws=50)  # fmt: skip
    from slt.chains import run_chains
    from slt.samplers import sgld

    kernel = sgld(step_size=1e-3, nbeta=posterior.nbeta, localization=1.0, center=posterior.anchor)
    run_chains(posterior, kernel, num_chains=2, num_steps=60, seed=0, progress=False,
               observe=recorder)  # fmt: skip
    stats = recorder.close()
    with h5py.File(path) as f:
        rows = f["per_sample_loss"][:]
    assert stats.count.tolist() == [10, 10]
    flat = rows.reshape(-1, 128)
    mean, var, lse = stats.pooled()
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-10)
    np.testing.assert_allclose(var, flat.var(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(lse, np.log(np.exp(-flat).mean(0)), rtol=1e-10)


def test_per_sample_needs_a_path():
    case = zoo.regular(2, n=64)
    with pytest.raises(ValueError, match="record_path"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, record="per_sample",
                         progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="record"):
        slt.estimate_llc(case.model, case.loader(), case.loss_fn, record="all", progress=False)


def test_per_sample_losses_use_the_attention_the_chains_sample():
    # under no_grad alone, nn.TransformerEncoder takes PyTorch's nested-tensor fast path,
    # which zeroes padded positions that the sampled loss (and L_n(w*)) computes: the
    # recorded losses were of another function (mean 1.48 against L_n(w*) = 1.62)
    from slt.posterior import Posterior

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            length = 2 + (x[:, 0, 0] > 0).long() * 3  # right-padded, length from the data
            padded = torch.arange(x.shape[1]) >= length[:, None]
            return self.head(self.encoder(x, src_key_padding_mask=padded).mean(1))

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Encoder().eval()
    x, y = torch.randn(64, 6, 8, generator=g), torch.randn(64, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    posterior = Posterior(model, loader, slt.gaussian_nll(1.0))
    recorder = PerSampleRecorder(posterior, num_chains=1, start=0, every=1)
    posterior.reset()
    assert recorder.losses().mean() == pytest.approx(posterior.init_loss, rel=1e-5)


@pytest.mark.parametrize("microbatch", [None, 4])
def test_the_sample_axis_is_the_datasets_order(tmp_path, microbatch):
    # a shuffled loader's pass is put back in order: column i is sample i, whatever the
    # micro-batches; the first draw without burn-in is w*, where column i is ℓ_i(w*)
    case = zoo.regular(3, 1, n=64)
    path = tmp_path / "ps.h5"
    loader = torch.utils.data.DataLoader(case.dataset, batch_size=16, shuffle=True)
    slt.estimate_llc(case.model, loader, case.loss_fn, num_chains=1, num_draws=2, num_burnin=0,
                     record="per_sample", record_every=1, record_path=str(path),
                     microbatch=microbatch, chain_method="loop", progress=False)  # fmt: skip
    with torch.no_grad():
        exact = per_sample(case.loss_fn)(case.model, case.dataset.tensors).double().numpy()
    with h5py.File(path) as f:
        np.testing.assert_allclose(f["per_sample_loss"][0, 0], exact, rtol=1e-6)
        assert f["per_sample_loss"].attrs["sample_order"] == "dataset"


def test_per_sample_path_is_absolute(tmp_path, monkeypatch):
    # a relative record_path was kept as given: a result loaded from another folder pointed
    # nowhere
    monkeypatch.chdir(tmp_path)
    case = zoo.regular(2, n=64)
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, num_chains=1,
                           num_draws=4, num_burnin=1, record="per_sample", record_every=2,
                           record_path="ps.h5", progress=False)  # fmt: skip
    assert res.per_sample_path == str(tmp_path / "ps.h5")


class _MapStyle(torch.utils.data.Dataset):
    """The same samples as a TensorDataset, through __getitem__ (off the sliced path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_per_sample_columns_are_the_datasets_samples_for_any_standard_loader(tmp_path):
    # off the TensorDataset path the pass was slt's private shuffle: column i was not
    # sample i (correlation 0.08 with its loss at w*), and no order was recorded
    case = zoo.regular(2, n=96)
    x, y = case.dataset.tensors
    loader = torch.utils.data.DataLoader(_MapStyle(x, y), batch_size=32, shuffle=True)
    res = slt.estimate_llc(case.model, loader, case.loss_fn, step_size=1e-9, num_chains=1,
                           num_draws=4, num_burnin=0, record="per_sample", record_every=2,
                           record_path=tmp_path / "ps.h5", progress=False)  # fmt: skip
    with torch.no_grad():
        at_center = case.loss_fn.per_sample(case.model, (x, y)).double().numpy()
    with h5py.File(tmp_path / "ps.h5") as f:
        assert f["per_sample_loss"].attrs["sample_order"] == "dataset"
        np.testing.assert_allclose(f["per_sample_loss"][0, 0], at_center, rtol=1e-4)
    assert res.per_sample_path is not None
