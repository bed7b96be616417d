"""The one exception family that the command line turns into a clear message instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ClapError(Exception):
    """Bad input or an unmet precondition, described for the user (file, line, field, what was expected)."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The valid names nearest to ``name``, for 'did you mean' hints in error messages."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:  # fall back on shared prefixes so a hint is almost always offered
        stem = name.split(".")[0].split("[")[0]
        found = [c for c in candidates if c.startswith(stem)][:n]
    return found
