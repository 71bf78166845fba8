"""Test-session settings: one intra-op thread. The suite's models are tiny, and on a
2-core machine torch's thread pool costs more than it saves (measured 10-20x slower
full-batch runs when the cores are shared)."""

import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one thread and leaves one, whatever it set (the trajectory
    tests compare with workers that run one)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from global generators seeded by its own name, so what it draws
    without a seed of its own does not depend on which tests ran before it in the process
    (the suite runs on two workers that share the tests out as they finish)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global generator is what it seeds)
    random.seed(seed)


@pytest.fixture
def no_cache(monkeypatch):
    """Posteriors built in the test keep no per-sample cache: the passes at w* run."""
    from slt import posterior

    def build(self):
        self._cache_built = True
        self._cache_loss = self._cache_grad = self._factors = None

    monkeypatch.setattr(posterior.Posterior, "_build_cache", build)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray cluster for every test that needs it: a second ``ray.init`` in the
    same process, after a ``shutdown``, timed out waiting for its GCS server on a busy
    2-core machine. Workers get tests/ on PYTHONPATH (the trajectory tests' factories)."""
    ray = pytest.importorskip("ray")
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_USAGE_STATS_ENABLED")}
    os.environ["HOME"] = str(tmp_path_factory.mktemp("ray-home"))  # Ray writes under ~
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tests = str(Path(__file__).parent / "tests")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": tests}})  # fmt: skip
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield ray
    ray.shutdown()
