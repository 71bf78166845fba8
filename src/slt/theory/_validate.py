"""Argument checks shared by the closed forms: exact integers, with errors naming the argument."""

from __future__ import annotations

import operator
from collections.abc import Iterable


def as_int(value: object, name: str, *, minimum: int) -> int:
    """Return ``value`` as an ``int``, or raise ``ValueError`` naming ``name``.

    Accepts anything with ``__index__`` (Python and NumPy integers), rejects ``bool``
    and non-integers such as ``2.0``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {result}")
    return result


def as_sequence(value: object, name: str, what: str) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a sequence (not a string)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of {what}, got {value!r}")
