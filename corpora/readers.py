"""One entry point over every input format: files, folders, fetch stores and saved datasets, in a stable order.

Inputs are read in the order given (folders expand to their supported files sorted by name, so a PubMed
baseline file comes before the update files that revise it). A whole-file problem (empty, not XML, wrong root,
no Abstract column) raises, or under ``--skip-bad`` is reported and the next file is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from corpora.errors import CorpusInputError, ProblemLog
from corpora.records import Event
from corpora.sources import detect_format

#: File name endings collected when a plain folder is given as input.
SUPPORTED_SUFFIXES = (".xml", ".xml.gz", ".txt", ".txt.gz", ".nbib", ".medline", ".csv", ".csv.gz", ".tsv",
                      ".tsv.gz", ".xlsx", ".jsonl")


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files to read: each file as given; a store or saved dataset as one input; other folders recursively."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise CorpusInputError(path, "no such file or folder")
        if path.is_dir():
            try:
                detect_format(path)
                out.append(path)
                continue
            except CorpusInputError:
                pass
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES))
            if not found:
                raise CorpusInputError(path, f"folder holds no corpus files ({', '.join(SUPPORTED_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(path)
    return out


def iter_file(path: Path, problems: ProblemLog) -> Iterator[Event]:
    """Events of one input, dispatched on its detected format."""
    fmt = detect_format(path)
    if fmt == "xml":
        from corpora.parse_xml import iter_xml
        return iter_xml(path, problems)
    if fmt == "medline":
        from corpora.parse_medline import iter_medline
        return iter_medline(path, problems)
    if fmt in ("csv", "tsv", "xlsx"):
        from corpora.parse_table import iter_table
        return iter_table(path, fmt, problems)
    if fmt == "jsonl":
        from corpora.store import iter_jsonl
        return iter_jsonl(path, problems)
    if fmt == "store":
        from corpora.store import RECORDS, iter_jsonl
        return iter_jsonl(path / RECORDS, problems, source=f"{path.name}/{RECORDS}")
    from corpora.hub import iter_hf_dataset  # hf-disk
    return iter_hf_dataset(path, problems=problems)


def iter_inputs(paths: Iterable[str | Path], problems: ProblemLog, hf_dataset: str | None = None,
                hf_split: str | None = None) -> Iterator[Event]:
    """Events of all inputs in order; whole-file failures obey ``problems.skip_bad``."""
    for path in expand_inputs(paths):
        try:
            yield from iter_file(path, problems)
        except CorpusInputError as exc:
            problems.report(exc)
        except OSError as exc:  # unreadable (permissions, I/O error, a folder vanished while read)
            problems.report(CorpusInputError(path, f"cannot read ({exc.strerror or exc})"))
    if hf_dataset:
        from corpora.hub import iter_hf_dataset
        yield from iter_hf_dataset(hf_dataset, split=hf_split, problems=problems)
