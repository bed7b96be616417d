"""Value types for command-line options that every area's commands share, checked while the arguments are parsed.

Why at parse time: ``clap run --max-rows 0`` used to be refused only when a patch stage started (after the corpus and
fine-tuning stages, minutes later) and without naming the option; argparse names it and stops before anything runs.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1 (``--max-rows``, ``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value
