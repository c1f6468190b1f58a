"""Value ranges of loss hyperparameters: the legal ones (outside, the loss trains the wrong way or not at all) and
the typical ones (published settings; outside, a warning).

A :class:`Range` is an interval with open or closed ends and the reason for it; the loss modules declare one per
hyperparameter in their :class:`~preftune.losses.base.LossSpec`. Torch-free on purpose: the config checks values
before any tensor exists.
"""

from __future__ import annotations

import math
import numbers
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The interval low (<|≤) x (<|≤) high; None is an unbounded end. ``why`` says where the bounds come from.

    Example: ``Range(0.0, 0.5, high_open=True, why="a flip rate")`` is 0 ≤ x < 0.5.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or not (x > self.high or (self.high_open and x == self.high))

    def describe(self, name: str) -> str:
        """``0 <= label_smoothing < 0.5``, ``beta > 0``, ``tau <= 1``."""
        left = f"{self.low:g} {'<' if self.low_open else '<='} " if self.low is not None else ""
        right = f" {'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""
        if left and not right:  # "beta > 0" reads better than "0 < beta"
            return f"{name} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{left}{name}{right}" if left or right else f"{name} finite"

    def span(self) -> str:
        """``0.01-0.5`` (a typical range, both ends given)."""
        return f"{self.low:g}-{self.high:g}"


def positive(why: str) -> Range:
    """x > 0."""
    return Range(0.0, None, low_open=True, why=why)


def nonnegative(why: str) -> Range:
    """x ≥ 0."""
    return Range(0.0, None, why=why)


def typical(low: float, high: float, why: str) -> Range:
    """A closed typical range low ≤ x ≤ high with its source."""
    return Range(low, high, why=why)


def kind_of(annotation) -> str | tuple:
    """What a hyperparameter's annotation asks for: ``"number"``, ``"integer"``, ``"boolean"``, ``"string"``, a
    tuple of allowed literals, any of these with ``"?"`` appended when None is allowed too (``float | None``), or
    ``"any"`` (unannotated or a union the checks do not interpret)."""
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2 and typing.get_origin(annotation) is not typing.Literal:
        inner = kind_of(next(a for a in args if a is not type(None)))
        return inner if inner == "any" or isinstance(inner, tuple) and None in inner else (
            inner + (None,) if isinstance(inner, tuple) else inner + "?")
    if annotation is float:
        return "number"
    if annotation is int:
        return "integer"
    if annotation is bool:
        return "boolean"
    if annotation is str:
        return "string"
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return "any"


def coerce(value, kind):
    """``value`` as ``kind`` wants it, or raise TypeError with what was expected.

    A number may arrive as a string (PyYAML reads ``5e-6``, without a dot, as one); a bool is never a number.
    """
    if isinstance(kind, str) and kind.endswith("?"):
        if value is None:
            return None
        try:
            return coerce(value, kind[:-1])
        except TypeError as e:
            raise TypeError(f"{e.args[0]} or null") from None
    if kind == "number":
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if kind == "integer":
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise TypeError("an integer")
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if kind == "string":
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if isinstance(kind, tuple):
        if value in kind:
            return value
        raise TypeError("one of " + ", ".join(repr(k) for k in kind))
    return value
