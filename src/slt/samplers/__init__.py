"""Samplers as pure ``init``/``step`` kernels (see :mod:`slt.samplers.base`)."""

from slt.samplers.base import Kernel, StepInfo
from slt.samplers.rmsprop_sgld import rmsprop_sgld
from slt.samplers.sgld import sgld

SAMPLERS = {"sgld": sgld, "rmsprop_sgld": rmsprop_sgld}

__all__ = ["SAMPLERS", "Kernel", "StepInfo", "rmsprop_sgld", "sgld"]
