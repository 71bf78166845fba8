"""Test-session settings: one intra-op thread. The suite's models are tiny, and on a
2-core machine torch's thread pool costs more than it saves (measured 10-20x slower
full-batch runs when the cores are shared)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def no_cache(monkeypatch):
    """Posteriors built in the test keep no per-sample cache: the passes at w* run."""
    from slt import posterior

    def build(self):
        self._cache_built = True
        self._cache_loss = self._cache_grad = self._factors = None

    monkeypatch.setattr(posterior.Posterior, "_build_cache", build)
