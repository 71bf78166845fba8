"""``to_dict`` for the evidence results: plain Python numbers and lists (JSON-serialisable)."""

from __future__ import annotations

import dataclasses

import numpy as np


class ToDict:
    """Mixin for frozen result dataclasses.

    >>> @dataclasses.dataclass(frozen=True)
    ... class R(ToDict):
    ...     x: np.ndarray
    ...     t: tuple
    >>> R(np.arange(2), (1, 2)).to_dict()
    {'x': [0, 1], 't': [1, 2]}
    """

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, np.generic):
                value = value.item()
            out[f.name] = value
        return out
