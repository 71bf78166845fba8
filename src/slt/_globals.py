"""The global state user code may draw on while slt runs it: the global random states
(torch's CPU one, CUDA's once it is initialised, numpy's legacy one and Python's
``random``) and autograd's mode.

slt never draws from the global random states itself (one generator per chain:
:func:`slt.chains.chain_generators`), but a model's always-on dropout, a dataset's random
augmentation or a loader's sampler may. :func:`private` runs a block on private copies
seeded from a seed, with autograd on whatever the caller's mode. (A chain's batches carry
a torch state of their own: :mod:`slt.data`.)
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

States = tuple[torch.Tensor, list[torch.Tensor], Any, Any]  # torch, CUDA, numpy, random


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def current() -> States:
    """The global random states as they are."""
    cuda = [torch.cuda.get_rng_state(d) for d in _cuda_devices()]
    legacy = np.random.get_state()  # noqa: NPY002 (the global state user code draws from)
    return torch.get_rng_state(), cuda, legacy, random.getstate()


def restore(states: States) -> None:
    """Set the global random states to ``states`` (from :func:`current` or :func:`seeded`)."""
    cpu, cuda, numpy_state, python_state = states
    torch.set_rng_state(cpu)
    for device, state in enumerate(cuda):
        torch.cuda.set_rng_state(state, device)
    np.random.set_state(numpy_state)  # noqa: NPY002
    random.setstate(python_state)


def seeded(seed: int) -> States:
    """Global random states seeded from ``seed`` (an int >= 0), built without touching the
    global ones: torch's as ``torch.manual_seed(seed)`` leaves it."""
    words = np.random.SeedSequence(seed).generate_state(2)
    cuda = [torch.Generator(device=f"cuda:{d}").manual_seed(seed).get_state()
            for d in _cuda_devices()]  # fmt: skip
    return (
        torch.Generator().manual_seed(seed).get_state(),
        cuda,
        np.random.RandomState(int(words[0])).get_state(),
        random.Random(int(words[1])).getstate(),
    )


@contextmanager
def private(seed):
    """Run the block on private global random states seeded from ``seed`` (torch's as
    ``torch.manual_seed(seed ^ 0x5EED)``), the caller's restored after, and with autograd
    on (outside ``torch.no_grad`` and ``torch.inference_mode``): what user code draws from
    them repeats with the seed, and an estimate called under ``no_grad`` runs as outside
    it (and without vmap's "file us an issue" warning: :func:`slt.losses.quiet_vmap_fallback`).
    A ``seed`` that is not an int >= 0 is left to the caller's check (the states are
    then private but unseeded)."""
    from slt.losses import quiet_vmap_fallback

    valid = isinstance(seed, int | np.integer) and not isinstance(seed, bool) and seed >= 0
    outer = current()
    if valid:
        restore(seeded(int(seed) ^ 0x5EED))
    try:
        with torch.inference_mode(False), torch.enable_grad(), quiet_vmap_fallback():
            yield
    finally:
        restore(outer)
