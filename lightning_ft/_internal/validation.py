"""Argument checks shared by every family: one wording for every error."""

from __future__ import annotations

from typing import Any

__all__ = ["check_fraction", "check_int"]


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be an integer >= {minimum}{suffix}, got {value!r}.")


def check_fraction(name: str, value: Any, closed_right: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a number in [0, 1) (``closed_right``: [0, 1])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
        raise ValueError(f"`{name}` must be in {'[0, 1]' if closed_right else '[0, 1)'}, got {value!r}.")
