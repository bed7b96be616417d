"""Streaming parser for MEDLINE / NBIB tagged text (PubMed's "Send to: citation manager" and ``rettype=medline``).

Each line is ``TAG - value`` with the tag left-aligned in a 4-character field; a value continues on following lines
indented by spaces; a blank line ends a citation. The file is read line by line, one citation at a time.
Wrapped values are joined with single spaces, so abstracts match those parsed from XML.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

from corpora.errors import CorpusInputError, ProblemLog
from corpora.records import PubmedRecord
from corpora.sources import GZIP_ERRORS, open_binary

_TAG_LINE = re.compile(r"^([A-Z][A-Z0-9]{0,3}) {0,3}- ?(.*)$")
_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")


def _mesh_descriptor(value: str) -> str:
    """``Information Storage and Retrieval/*methods`` -> ``Information Storage and Retrieval``."""
    return value.split("/", 1)[0].lstrip("*").strip()


def _record(fields: list[tuple[str, str, int]], source: str) -> PubmedRecord:
    first_line = fields[0][2]
    values: dict[str, list[str]] = {}
    for tag, value, _line in fields:
        values.setdefault(tag, []).append(value)
    pmids = values.get("PMID", [])
    if not pmids or not pmids[0].isdigit():
        found = f"PMID {pmids[0]!r}" if pmids else "no PMID line"
        raise CorpusInputError(source, f"citation without a numeric 'PMID- ' line ({found})", line=first_line)
    year_match = _YEAR.search(" ".join(values.get("DP", [])))
    return PubmedRecord(
        pmid=pmids[0],
        title=" ".join(values.get("TI", [])),
        abstract=" ".join(values.get("AB", [])),
        journal=(values.get("JT") or values.get("TA") or [""])[0],
        year=int(year_match.group(1)) if year_match else None,
        mesh_terms=[_mesh_descriptor(v) for v in values.get("MH", [])],
        keywords=list(values.get("OT", [])),
        source_file=source,
    )


def _opens_citation(line: str) -> bool:
    """Whether ``line`` is a ``PMID- `` line, which starts a new citation even without a blank line before it."""
    match = _TAG_LINE.match(line)
    return bool(match) and match.group(1) == "PMID"


def _fold_line(fields: list[tuple[str, str, int]], line: str, lineno: int, name: str) -> None:
    """Add one non-blank line to the citation being read: a new ``TAG - value`` or the continuation of the last.

    Kept apart from the reading loop so that loop only decides where citations end; a line that fits nowhere
    raises :class:`CorpusInputError` and the caller drops the citation.
    """
    if line[0] == " ":
        if not fields:
            raise CorpusInputError(name, "continuation line with no 'TAG - ' line before it", line=lineno)
        tag, value, first = fields[-1]
        fields[-1] = (tag, f"{value} {line.strip()}".strip(), first)
        return
    match = _TAG_LINE.match(line)
    if not match:
        raise CorpusInputError(
            name, f"expected 'TAG - value' (e.g. 'PMID- 123', 'AB  - ...'), got {line[:40]!r}", line=lineno)
    fields.append((match.group(1), match.group(2).strip(), lineno))


def iter_medline(path: str | Path, problems: ProblemLog | None = None, source: str | None = None
                 ) -> Iterator[PubmedRecord]:
    """Stream the citations of a MEDLINE tagged-text file (plain or gzipped)."""
    path = Path(path)
    name = source or path.name
    problems = problems if problems is not None else ProblemLog()
    fields: list[tuple[str, str, int]] = []  # (tag, value, line) of the citation being read
    bad_citation = False
    seen_any = False
    lineno = 0

    def finish() -> Iterator[PubmedRecord]:
        if fields and not bad_citation:
            try:
                yield _record(fields, name)
            except CorpusInputError as exc:
                problems.report(exc)

    with open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
        try:
            for lineno, line in enumerate(text, start=1):
                line = line.rstrip("\r\n")
                blank = not line.strip()
                if blank or (fields and _opens_citation(line)):  # a PMID line with no blank line before it
                    yield from finish()
                    fields, bad_citation = [], False
                if blank:
                    continue
                seen_any = True
                try:
                    _fold_line(fields, line, lineno, name)
                except CorpusInputError as exc:
                    problems.report(exc)
                    bad_citation = True
        except UnicodeDecodeError as exc:
            problems.report(CorpusInputError(name, f"not UTF-8 text ({exc.reason})", line=lineno + 1))
            return
        except GZIP_ERRORS as exc:
            problems.report(CorpusInputError(name, f"gzip stream ends early or is damaged: {exc}", line=lineno))
            return
        yield from finish()
    if not seen_any:
        raise CorpusInputError(name, "file holds no MEDLINE citations (only blank lines)")
