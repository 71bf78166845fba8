"""What the benchmarks share: the run settings and the data and λ̂ helpers of
``bench_llc.py``, the per-chain-step timing and the header line of the others."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

import slt.chains
import slt.traced


@dataclass(frozen=True)
class Run:
    """One benchmark configuration shared by every method on a case."""

    num_chains: int
    num_burnin: int
    num_draws: int
    repeats: int
    step_size: float = 5e-5
    localization: float = 1.0
    batch_size: int = 128

    @property
    def steps(self) -> int:
        return self.num_burnin + self.num_draws

    def short(self, num_draws: int) -> Run:
        """The same run with no burn-in and ``num_draws`` draws per chain."""
        return Run(self.num_chains, 0, num_draws, 1, self.step_size, self.localization,
                   self.batch_size)  # fmt: skip

    def label(self) -> str:
        return f"{self.num_chains}×({self.num_burnin}+{self.num_draws})"


def minibatches(x, y, batch_size: int, generator: torch.Generator):
    """Shuffled epochs of (x, y) minibatches sliced from the tensors (what slt does itself)."""
    n = x.shape[0]
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


def full_loss(case, model) -> float:
    """L_n at the model's parameters, over the whole dataset in one batch."""
    with torch.no_grad():
        return float(case.loss_fn(model, case.dataset.tensors))


def per_chain_llc(losses: torch.Tensor, init_loss: float, nbeta: float) -> np.ndarray:
    """(chain,) λ̂ = nβ (mean_t L_{B_t}(w_t) - L_n(w*)) from (chain, draw) losses."""
    return nbeta * (losses.double().mean(dim=1).numpy() - init_loss)


def per_chain_step(call: Callable[[int], float], chains: int, steps: int, repeats: int) -> float:
    """µs per chain-step from ``call(draws) -> seconds``: the median full call minus the
    median one-draw call (the fixed cost), over ``chains × (steps − 1)`` steps."""
    full = statistics.median(call(steps) for _ in range(repeats))
    short = statistics.median(call(1) for _ in range(repeats))
    return (full - short) / (chains * (steps - 1)) * 1e6


@contextmanager
def traced_passes(traced: bool) -> Iterator[None]:
    """Within it, every run replays its gradient passes from traced graphs, however short —
    vmapped, and in the loop up to ``slt.chains.LOOP_TRACE_MAX_PARAMS`` sampled parameters,
    as in long estimates — (``traced``), or none does (``slt.traced``); restored on exit."""
    names = "MIN_STEPS", "LOOP_TRACE_MIN_STEPS", "LOOP_TRACE_MIN_STEPS_COLD"
    owners = slt.traced, slt.chains, slt.chains
    saved = slt.traced.enabled, [getattr(o, n) for o, n in zip(owners, names)]
    slt.traced.enabled = traced
    for owner, name in zip(owners, names):
        setattr(owner, name, 0)
    try:
        yield
    finally:
        slt.traced.enabled = saved[0]
        for owner, name, value in zip(owners, names, saved[1]):
            setattr(owner, name, value)


def machine_speed(steps: int = 200, fills: int = 5) -> dict[str, float]:
    """How fast the machine runs right now, from two fixed workloads that run no slt code:
    ``step_us``, the median of ``steps`` plain SGD steps of a fixed 32-64-1 MLP on a batch
    of 128 (the cost of a step), and ``fresh_memory_ms``, the median of ``fills`` 64 MB
    tensors filled on new pages (first-touch page faults: in one slow spell of this shared
    VM one-step calls ran up to 8× slower while steps ran 1.75× slower). ~0.3 s. Taken
    before and after each case, so that a case measured in a slow spell can be told from a
    slow method."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        model = torch.nn.Sequential(*layers)
    x, y = torch.randn(128, 32, generator=generator), torch.randn(128, 1, generator=generator)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step_s = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step_s.append(time.perf_counter() - start)
    fill_s = []
    for _ in range(fills):
        start = time.perf_counter()
        filled = torch.ones(1 << 24)
        fill_s.append(time.perf_counter() - start)
        del filled
    return {"step_us": statistics.median(step_s) * 1e6,
            "fresh_memory_ms": statistics.median(fill_s) * 1e3}  # fmt: skip


def noise_draw_us(num_params: int, repeats: int = 50) -> float:
    """Median µs to draw ``num_params`` standard normals from a ``torch.Generator`` into a
    buffer reused from draw to draw: what every SGLD step must draw (slt's and devinterp's
    alike) and a plain SGD step does not. On CPU the generator (mt19937) runs on one thread,
    so on a large model it is a fixed share of the step that no implementation avoids."""
    generator = torch.Generator().manual_seed(0)
    buffer = torch.empty(num_params)
    torch.randn(buffer.shape, generator=generator, out=buffer)  # first touch of the buffer
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.randn(buffer.shape, generator=generator, out=buffer)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def one_thread_header() -> str:
    """Sets torch to one thread and returns the line a benchmark's table starts with: the
    time (UTC), torch's version, the CPU and the thread count."""
    torch.set_num_threads(1)
    cpu = platform.processor() or platform.machine()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{when}  torch {torch.__version__}  {cpu}  1 thread"
