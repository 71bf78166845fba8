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


def integer(name: str, value, *, minimum: int) -> int:
    """``value`` as an int (numpy integers included, bools refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def microbatch(value):
    """The ``microbatch`` argument: ``"auto"``, None, or an int >= 1."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f'microbatch must be "auto", None or an integer >= 1, got {value!r}')
    return int(value)


def finite_loss_at_center(value: float) -> float:
    """L_n(w*), unless it is NaN or infinite."""
    if not math.isfinite(value):
        raise ValueError(
            f"the loss at w* (the model as given) is {value}; check the model and loss_fn"
        )
    return value
