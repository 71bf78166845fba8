"""Text cells padded by the columns they take on screen, not their code points: λ̂ and R̂
carry a combining mark, one code point that takes no column."""

from __future__ import annotations

import unicodedata


def columns(text: str) -> int:
    """The columns ``text`` takes: its code points less its combining marks.

    >>> len("λ̂"), columns("λ̂")
    (2, 1)
    """
    return sum(not unicodedata.combining(ch) for ch in text)


def right(text: str, width: int) -> str:
    """``text`` right-aligned in ``width`` columns (as ``f"{text:>width}"`` for plain text)."""
    return " " * max(width - columns(text), 0) + text


def left(text: str, width: int) -> str:
    """``text`` left-aligned in ``width`` columns."""
    return text + " " * max(width - columns(text), 0)


def few(items: list[str], limit: int = 8) -> str:
    """The first ``limit`` of ``items`` joined, with how many more; "(none)" if empty.

    >>> few(["a", "b", "c"], 2)
    'a, b and 1 more'
    """
    if not items:
        return "(none)"
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
