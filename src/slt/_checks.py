"""Argument checks whose errors name the argument, the value, and what is accepted."""

from __future__ import annotations

import math
import numbers


def real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    strict_max: bool = False,
) -> float:
    """``value`` as a finite float (numpy scalars and 0-d arrays or tensors included),
    optionally bounded."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if maximum is not None:
        bound += f"{' and' if bound else ''} {'<' if strict_max else '<='} {maximum:g}"
    if (
        not math.isfinite(value)
        or (minimum is not None and (value <= minimum if strict else value < minimum))
        or (maximum is not None and (value >= maximum if strict_max else value > maximum))
    ):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def integer(name: str, value, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int (numpy integers included, bools refused), at least ``minimum``
    (and at most ``maximum``)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):  # fmt: skip
        bound = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def seed(value) -> int:
    """The ``seed`` argument: an int from 0 to 2⁶⁴ − 1 (what torch's generators take)."""
    return integer("seed", value, minimum=0, maximum=2**64 - 1)


def microbatch(value):
    """The ``microbatch`` argument: ``"auto"``, None, or an int >= 1."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'microbatch must be "auto", None or an integer >= 1, got {value!r}')
    return int(value)


def choice(name: str, value, options) -> str:
    """``value`` if it is one of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


def positive_reals(name: str, value) -> list[float]:
    """A non-empty sequence of finite numbers > 0, as floats (a lone number or a string is
    refused, with what is accepted)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of finite numbers > 0, got {value!r}")
    out = [real(name, v, minimum=0, strict=True) for v in value]
    if not out:
        raise ValueError(f"{name} must be a list of finite numbers > 0, got an empty {value!r}")
    return out


class NonFiniteLoss(ValueError):
    """The loss at the point a posterior is built around is NaN or infinite."""


def finite_loss_at_center(value: float) -> float:
    """L_n(w*), unless it is NaN or infinite."""
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"the loss at w* (the model as given) is {value}; check the model and loss_fn"
        )
    return value


def whole_numbers(name: str, value, *, minimum: float = -math.inf) -> list[int]:
    """A sequence of whole numbers (``2`` or ``2.0``, numpy scalars too) >= ``minimum``, as
    ints; a string, a lone number or a non-whole entry is refused, naming ``name``."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of whole numbers, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        v = entry.item() if getattr(entry, "ndim", None) == 0 and hasattr(entry, "item") else entry
        if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                or v != int(v) or v < minimum):  # fmt: skip
            bound = "" if minimum == -math.inf else f" >= {minimum:g}"
            raise ValueError(f"{name} must be whole numbers{bound}, got {entry!r} at position {i}")
        out.append(int(v))
    return out
