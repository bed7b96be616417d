"""Errors and the bad-input report shared by all corpus parsers.

A parser never prints: a problem either raises :class:`CorpusInputError` (the default: stop with a message that
names the file, the line or record and what was expected) or, under ``--skip-bad``, is appended to a
:class:`ProblemLog` and parsing goes on, so the good records are kept and the bad ones reported together.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clap.errors import ClapError


class CorpusError(ClapError):
    """A corpus step cannot go on (bad arguments, unreadable output folder, a failed download)."""


class CorpusInputError(CorpusError):
    """An input file is not what its format promises."""

    def __init__(self, source: str | Path, message: str, line: int | None = None, record: str | None = None):
        self.source = str(source)
        self.line = line
        self.record = record
        self.reason = message
        where = self.source
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", record {record}"
        super().__init__(f"{where}: {message}")


class EutilsError(CorpusError):
    """The E-utilities server kept failing or answered something unusable."""


@dataclass
class Problem:
    """One bad record or file skipped under ``--skip-bad``."""

    source: str
    reason: str
    line: int | None = None
    record: str | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f", line {self.line}"
        if self.record is not None:
            where += f", record {self.record}"
        return f"{where}: {self.reason}"


@dataclass
class ProblemLog:
    """Decides what a problem does: raise (``skip_bad=False``) or be recorded (``skip_bad=True``)."""

    skip_bad: bool = False
    problems: list[Problem] = field(default_factory=list)

    def report(self, error: CorpusInputError) -> None:
        """Raise ``error`` unless bad input is being skipped, in which case remember it."""
        if not self.skip_bad:
            raise error
        self.problems.append(Problem(error.source, error.reason, error.line, error.record))

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            for problem in self.problems:
                fh.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")
