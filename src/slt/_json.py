"""Plain JSON for the files slt writes: NaN and ±inf as ``null``, numpy scalars and arrays as
numbers and lists (``json.dumps`` would write bare ``NaN``, which strict readers refuse)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """``value`` with every non-finite float as None, recursively.

    >>> plain({"a": float("nan"), "b": [1.5, np.float64("inf")], "c": np.arange(2)})
    {'a': None, 'b': [1.5, None], 'c': [0, 1]}
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`plain` ``(value)``, refusing anything still not plain JSON."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)
