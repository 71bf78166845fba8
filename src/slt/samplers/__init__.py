"""Samplers as pure ``init``/``step`` kernels (see :mod:`slt.samplers.base`).

``FULL_BATCH`` names the kernels that need the same batch (the whole dataset) at every
step: MALA's accept test compares the target at two points on one batch.
"""

from slt.samplers.base import Kernel, StepInfo
from slt.samplers.mala import mala
from slt.samplers.rmsprop_sgld import rmsprop_sgld
from slt.samplers.sgld import sgld
from slt.samplers.sgnht import sgnht

SAMPLERS = {"sgld": sgld, "rmsprop_sgld": rmsprop_sgld, "sgnht": sgnht, "mala": mala}
FULL_BATCH = frozenset({"mala"})

__all__ = ["FULL_BATCH", "SAMPLERS", "Kernel", "StepInfo", "mala", "rmsprop_sgld", "sgld", "sgnht"]
