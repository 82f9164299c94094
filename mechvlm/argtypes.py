"""argparse types shared by mechvlm's command lines (``mechvlm ...``, ``python -m
mechvlm.toy.train``): a bad value is refused by argparse, which names the option."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1 (``--limit``, ``--batch-size``, ``--questions``, ``--tokens``, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
