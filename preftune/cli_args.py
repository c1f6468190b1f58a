"""argparse value types shared by every ``preftune`` subcommand, so one flag means one thing everywhere.

    positive_int       an integer >= 1 (counts, sizes, windows)
    nonnegative_int    an integer >= 0 (example counts, where 0 means "none")
    fraction           a number in (0, 1]: a part that must not be empty (top-p, a share to keep)
    fraction_or_zero   a number in [0, 1]: a threshold where 0 and 1 are both meaningful ("no unusable row
                       allowed", "warn above this share")
NaN and infinities are refused by every type (they fail the range checks).
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1]: a part that must not be empty."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def fraction_or_zero(text: str) -> float:
    """A share in [0, 1]: a threshold for which 0 is a real setting, not an empty part."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value
