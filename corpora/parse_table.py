"""Tables of citations: CSV, TSV and XLSX with the seed spreadsheet's columns, and rows of any table-like source.

The seed study exported its corpus by hand as ``PMID, Title, Abstract, Journal, Keywords, URL``; the Hugging Face
copy of it has the same columns. Headers are matched case- and punctuation-insensitively with a few common aliases
(``PubMed ID``, ``Journal Title``, ``Publication Year`` ...). ``PMID`` and ``Abstract`` are required; a table
without them is rejected with the columns it does have and the nearest match. Rows are read one at a time
(``csv`` reader, openpyxl read-only mode), so large exports stream in constant memory.
"""

from __future__ import annotations

import csv
import io
import math
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from clap.errors import closest
from corpora.errors import CorpusInputError, ProblemLog
from corpora.records import PubmedRecord
from corpora.sources import GZIP_ERRORS, open_binary

#: record field -> accepted header spellings (after lower-casing and dropping non-alphanumerics)
ALIASES: dict[str, tuple[str, ...]] = {
    "pmid": ("pmid", "pubmedid", "pubmed"),
    "title": ("title", "articletitle"),
    "abstract": ("abstract", "abstracttext"),
    "journal": ("journal", "journaltitle", "journalname", "source"),
    "keywords": ("keywords", "keyword", "otherterms"),
    "url": ("url", "link"),
    "year": ("year", "publicationyear", "pubyear", "publicationdate", "pubdate", "date"),
    "mesh_terms": ("meshterms", "mesh", "meshheadings"),
}
REQUIRED = ("pmid", "abstract")
SEED_COLUMNS = ("PMID", "Title", "Abstract", "Journal", "Keywords", "URL")

_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")


def _norm(header: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(header or "").lower())


def map_columns(headers: Iterable[Any], source: str, line: int | None = None) -> dict[str, str]:
    """Record field -> the header that holds it; raises when PMID or Abstract is missing."""
    headers = [h for h in headers if h is not None and str(h).strip()]
    by_norm = {_norm(h): str(h) for h in headers}
    mapping = {}
    for field, aliases in ALIASES.items():
        for alias in aliases:
            if alias in by_norm:
                mapping[field] = by_norm[alias]
                break
    for field in REQUIRED:
        if field not in mapping:
            wanted = ALIASES[field][0].capitalize() if field != "pmid" else "PMID"
            hint = closest(wanted, [str(h) for h in headers])
            raise CorpusInputError(
                source,
                f"table has no {wanted} column (columns: {', '.join(map(str, headers)) or 'none'}; "
                f"expected the seed columns {', '.join(SEED_COLUMNS)})"
                + (f"; did you mean {hint[0]!r}?" if hint else ""),
                line=line,
            )
    return mapping


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def _pmid(value: Any) -> str:
    """PMIDs arrive as ints, floats (Excel) or text; spreadsheet exports also write integral floats as text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = _cell(value)
    if re.fullmatch(r"\d+\.0+", text):
        return text.split(".")[0]
    return text


def _terms(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [t for t in (_cell(v) for v in value) if t]
    text = _cell(value)
    if not text:
        return []
    separator = ";" if ";" in text else ("|" if "|" in text else ",")
    return [t.strip() for t in text.split(separator) if t.strip()]


def _year(value: Any) -> int | None:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return int(value) if 1500 <= value <= 2100 else None
    match = _YEAR.search(_cell(value))
    return int(match.group(1)) if match else None


def record_from_row(row: dict[str, Any], mapping: dict[str, str], source: str,
                    line: int | None = None, record: str | None = None) -> PubmedRecord:
    """One table row (header -> value) as a record; raises for a row without a numeric PMID."""
    pmid = _pmid(row.get(mapping["pmid"]))
    if not pmid.isdigit():
        raise CorpusInputError(source, f"PMID is {pmid!r}, expected digits", line=line, record=record)

    def get(field: str) -> Any:
        return row.get(mapping[field]) if field in mapping else None

    return PubmedRecord(
        pmid=pmid,
        title=_cell(get("title")),
        abstract=_cell(get("abstract")),
        journal=_cell(get("journal")),
        year=_year(get("year")),
        mesh_terms=_terms(get("mesh_terms")),
        keywords=_terms(get("keywords")),
        url=_cell(get("url")),
        source_file=source,
    )


def records_from_rows(rows: Iterable[dict[str, Any]], headers: Iterable[str], source: str,
                      problems: ProblemLog | None = None, first_line: int | None = None
                      ) -> Iterator[PubmedRecord]:
    """Records from dict rows (a table, a pandas frame, a Hugging Face dataset): the one path they all share.

    ``first_line`` is the line number of the first row in its file (None: locate rows by index instead).
    """
    problems = problems if problems is not None else ProblemLog()
    mapping = map_columns(headers, source)
    for index, row in enumerate(rows):
        line = first_line + index if first_line is not None else None
        try:
            yield record_from_row(row, mapping, source, line=line,
                                  record=None if first_line is not None else f"#{index}")
        except CorpusInputError as exc:
            problems.report(exc)


def _iter_delimited(path: Path, delimiter: str, name: str, problems: ProblemLog) -> Iterator[PubmedRecord]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader, None)
            while header is not None and not any(cell.strip() for cell in header):
                header = next(reader, None)
            if header is None:
                raise CorpusInputError(name, "table is empty (no header row)")
            mapping = map_columns(header, name, line=reader.line_num)
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(header):
                    problems.report(CorpusInputError(
                        name, f"row has {len(row)} cells, header has {len(header)}", line=reader.line_num))
                    continue
                try:  # a shorter row (trailing cells left out) leaves those columns absent
                    yield record_from_row(dict(zip(header, row, strict=False)), mapping, name, line=reader.line_num)
                except CorpusInputError as exc:
                    problems.report(exc)
        except UnicodeDecodeError as exc:
            problems.report(CorpusInputError(name, f"not UTF-8 text ({exc.reason})", line=reader.line_num + 1))
        except csv.Error as exc:
            problems.report(CorpusInputError(name, f"malformed CSV: {exc}", line=reader.line_num))
        except GZIP_ERRORS as exc:
            problems.report(CorpusInputError(name, f"gzip stream ends early or is damaged: {exc}",
                                             line=reader.line_num))


def _has_cells(values: tuple) -> bool:
    """Whether a worksheet row holds any non-blank cell (blank rows are skipped, before and after the header)."""
    return any(v is not None and str(v).strip() for v in values)


def _iter_xlsx(path: Path, name: str, problems: ProblemLog) -> Iterator[PubmedRecord]:
    import zipfile

    from openpyxl import load_workbook

    if path.stat().st_size == 0:
        raise CorpusInputError(name, "file is empty")
    try:
        workbook = load_workbook(path, read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise CorpusInputError(name, f"not a readable XLSX workbook ({exc})") from exc
    try:
        sheet = workbook.worksheets[0]
        rows = sheet.iter_rows(values_only=True)
        header_line, header = next(((n, values) for n, values in enumerate(rows, start=1) if _has_cells(values)),
                                   (0, None))
        if header is None:
            raise CorpusInputError(name, f"sheet {sheet.title!r} is empty (no header row)")
        keys = [str(h) if h is not None else "" for h in header]
        mapping = map_columns(keys, name, line=header_line)
        for line, values in enumerate(rows, start=header_line + 1):
            if not _has_cells(values):
                continue
            try:  # row and header may differ in length (openpyxl trims rows); unmatched cells are left out
                yield record_from_row(dict(zip(keys, values, strict=False)), mapping, name, line=line)
            except CorpusInputError as exc:
                problems.report(exc)
    finally:
        workbook.close()


def iter_table(path: str | Path, fmt: str | None = None, problems: ProblemLog | None = None,
               source: str | None = None) -> Iterator[PubmedRecord]:
    """Stream records from a CSV, TSV or XLSX file (``fmt`` one of ``csv``/``tsv``/``xlsx``; guessed from the name)."""
    path = Path(path)
    name = source or path.name
    problems = problems if problems is not None else ProblemLog()
    fmt = fmt or {".tsv": "tsv", ".tab": "tsv", ".xlsx": "xlsx"}.get(path.suffix.lower(), "csv")
    if fmt == "xlsx":
        return _iter_xlsx(path, name, problems)
    return _iter_delimited(path, "\t" if fmt == "tsv" else ",", name, problems)
