"""Per-sample losses of the full data at recorded draws, streamed so memory stays bounded.

At every ``every``-th post-burn-in step the recorder evaluates the per-sample NLL
ℓ_i(w_t) of every sample i (one pass over the data; sample i is the dataset's i-th for a
``DataLoader`` over a ``TensorDataset``, else the i-th of a pass of the loader) and

- folds it into running statistics per sample: the mean and variance of ℓ_i (Welford)
  and log Σ_t exp(-ℓ_i(w_t)) (for the posterior predictive), O(n) memory per chain —
  enough for WAIC (Watanabe 2010): T_n = -(1/n) Σ_i log E_w[exp(-ℓ_i(w))] and
  V_n = Σ_i Var_w[ℓ_i(w)];
- if given a ``path``, appends the row (n,) to an HDF5 dataset ``per_sample_loss`` of shape
  (chain, draw, sample), chunked by draw, so the full record never sits in memory. The file
  is written next to ``path`` and moved there by ``close(keep=True)`` (the run gave an
  estimate); a run that fails (an error, every chain diverged) leaves ``path`` as it was.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slt.attention import plain_attention
from slt.io import temporary_beside
from slt.losses import per_sample
from slt.posterior import Posterior


@dataclass(frozen=True)
class PerSampleStats:
    """Running statistics of ℓ_i(w) over recorded draws. Arrays are ``(chain, sample)``."""

    count: np.ndarray  # (chain,) draws recorded per chain
    mean: np.ndarray  # (chain, sample) mean of ℓ_i over draws
    m2: np.ndarray  # (chain, sample) Σ (ℓ_i - mean)² over draws (Welford)
    log_sum_exp_neg: np.ndarray  # (chain, sample) log Σ_t exp(-ℓ_i(w_t))

    def pooled(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance, log E_w[exp(-ℓ_i)]) per sample over all chains' draws, (sample,)."""
        total = self.count.sum()
        mean = (self.count[:, None] * self.mean).sum(0) / total
        m2 = (self.m2 + self.count[:, None] * (self.mean - mean) ** 2).sum(0)
        var = m2 / max(total - 1, 1)
        lse = np.logaddexp.reduce(self.log_sum_exp_neg, axis=0) - math.log(total)
        return mean, var, lse


class PerSampleRecorder:
    """An ``observe(chain, t)`` callback for :func:`slt.chains.run_chains`."""

    def __init__(
        self,
        posterior: Posterior,
        *,
        num_chains: int,
        start: int,
        every: int,
        path: str | Path | None = None,
        num_draws: int | None = None,
    ):
        if every < 1:
            raise ValueError(f"record_every must be an integer >= 1, got {every!r}")
        self.posterior = posterior
        self.start, self.every = start, every
        self.per_sample = per_sample(posterior.loss_fn)
        n = posterior.n
        self.count = np.zeros(num_chains, dtype=np.int64)
        self.mean = np.zeros((num_chains, n))
        self.m2 = np.zeros((num_chains, n))
        self.lse = np.full((num_chains, n), -np.inf)
        self._check_mean()  # before the file is created
        self.file = None
        if path is not None:
            import h5py

            rows = -(-num_draws // every) if num_draws else None
            self.path = Path(path)
            self.tmp = temporary_beside(self.path)
            try:
                self.file = h5py.File(self.tmp, "w")
            except BaseException:
                self.tmp.unlink(missing_ok=True)
                raise
            try:
                self.data = self.file.create_dataset(
                    "per_sample_loss", shape=(num_chains, rows or 0, n),
                    maxshape=(num_chains, None, n), dtype="f8", chunks=(1, 1, n),
                    fillvalue=np.nan,
                )  # fmt: skip
                self.data.attrs["description"] = "per-sample NLL at recorded post-burn-in draws"
                self.data.attrs["record_every"] = every
                self.data.attrs["burn_in"] = start
                self.data.attrs["sample_order"] = (
                    "dataset" if self.in_dataset_order else "one pass of the loader"
                )
            except BaseException:
                self._discard()
                raise

    def _check_mean(self) -> None:
        """Refuse a loss whose per-sample terms do not average to its batch value (a class
        ``weight`` or ``ignore_index``: a weighted mean): every recorded row would be on
        another scale than the loss the chains sampled. On one batch at w*, both under the
        same private random state (a model that draws in its forward draws alike); a loss
        that differs between two seeds is not checked. Once per posterior."""
        from slt import _globals

        post = self.posterior
        if post.per_sample_checked:
            return
        batch = (post.full_data if post.full_data is not None
                 else next(iter(post.batches.complete_pass())))  # fmt: skip

        def value(fn, seed: int) -> float:
            with _globals.private(seed), torch.no_grad(), plain_attention(enabled=post.attention):
                return float(fn(post.reference, batch).double().mean())

        whole = value(post.loss_fn, 0)
        if whole == value(post.loss_fn, 1):  # deterministic: the two must agree
            parts = value(self.per_sample, 0)
            if not math.isclose(parts, whole, rel_tol=1e-4, abs_tol=1e-7):
                raise ValueError(
                    f"per-sample losses: on a batch at w* their mean is {parts:.6g}, but "
                    f"loss_fn gives {whole:.6g}, so loss_fn is not the plain mean of "
                    "per-sample terms (a criterion with a class weight or an ignore_index is "
                    "a weighted mean). Write loss_fn as the plain mean of per-sample NLL "
                    "terms, e.g. lambda model, b: F.cross_entropy(model(b[0]), b[1], "
                    "weight=w, reduction='none').mean(), or record only the loss "
                    "(record='loss')"
                )
        post.per_sample_checked = True

    def losses(self) -> np.ndarray:
        """ℓ_i at the current chain parameters for every sample, (n,) float64: in the
        dataset's order where :attr:`in_dataset_order`, else in the order of one pass of
        the loader (a fixed one if it shuffles)."""
        out, where = [], []
        batches = (
            [(self.posterior.full_data, None)]
            if self.posterior.full_data is not None
            else self.posterior.batches.indexed_epoch(torch.Generator().manual_seed(0),
                                                      complete=True)
        )  # fmt: skip
        # attention as the sampled loss computes it (not PyTorch's no-grad fast path)
        with torch.no_grad(), plain_attention(enabled=self.posterior.attention):
            for batch, index in batches:
                out.append(self.per_sample(self.posterior.module, batch).double().cpu())
                where.append(index)
        values = torch.cat(out)
        if values.shape[0] != self.mean.shape[1]:
            raise ValueError(
                f"per-sample losses: one pass gave {values.shape[0]} samples, n is "
                f"{self.mean.shape[1]}; per-sample losses need n = the number of samples"
            )
        if where[0] is not None:  # sample indices known: the shuffled pass, put back
            index = torch.cat([torch.arange(values.shape[0])[i] if isinstance(i, slice)
                               else i.cpu() for i in where])  # fmt: skip
            values = torch.empty_like(values).index_copy_(0, index, values)
        return values.numpy()

    @property
    def in_dataset_order(self) -> bool:
        """Whether the sample axis is the dataset's order (else one pass of the loader's)."""
        batches = self.posterior.batches
        # the complete pass of a DataLoader with a standard sampler is in the dataset's order
        return (self.posterior.full_data is not None or batches.tensors is not None
                or batches.shuffle is not None)  # fmt: skip

    def __call__(self, chain: int, t: int) -> None:
        if t < self.start or (t - self.start) % self.every:
            return
        values = self.losses()
        k = self.count[chain] = self.count[chain] + 1
        with np.errstate(invalid="ignore", over="ignore"):  # a diverging chain's NaN and inf
            delta = values - self.mean[chain]
            self.mean[chain] += delta / k
            self.m2[chain] += delta * (values - self.mean[chain])
            self.lse[chain] = np.logaddexp(self.lse[chain], -values)
        if self.file is not None:
            row = (t - self.start) // self.every
            if row >= self.data.shape[1]:
                self.data.resize(row + 1, axis=1)
            self.data[chain, row] = values

    def close(self, keep: bool = True) -> PerSampleStats:
        """The statistics; the file moved to ``path`` if ``keep`` (the run gave an
        estimate), else discarded."""
        if self.file is not None:
            if not keep:
                self._discard()
            else:
                self.file.close()
                self.file = None
                try:
                    os.replace(self.tmp, self.path)
                except OSError:
                    self.tmp.unlink(missing_ok=True)  # nothing left beside the path
                    raise
        return PerSampleStats(self.count.copy(), self.mean.copy(), self.m2.copy(), self.lse.copy())

    def _discard(self) -> None:
        self.file.close()
        self.file = None
        self.tmp.unlink(missing_ok=True)
