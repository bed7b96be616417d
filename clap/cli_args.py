"""Value types for command-line options that every area's commands share, checked while the arguments are parsed.

Why at parse time: ``clap run --max-rows 0`` used to be refused only when a patch stage started (after the corpus and
fine-tuning stages, minutes later) and without naming the option; argparse names it and stops before anything runs.
"""

from __future__ import annotations

import argparse


def max_rows(text: str) -> int:
    """``--max-rows``: rows per forward pass, at least 3 (a probe's clean and corrupted baselines and one patched
    row; the spec's ``execution.max_rows`` has the same minimum)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of rows, got {text!r}") from None
    if value < 3:
        raise argparse.ArgumentTypeError(f"{value} rows per forward pass: a batch needs at least 3 (a probe's clean "
                                         "and corrupted baselines and one patched row)")
    return value
