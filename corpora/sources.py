"""Opening corpus inputs and telling their formats apart.

Formats are recognised by name first (``.xml[.gz]``, ``.txt``/``.nbib``/``.medline``, ``.csv``, ``.tsv``,
``.xlsx``, ``.jsonl``) and by content when the name says nothing (XML starts with ``<``, MEDLINE text with
``PMID-``), so a renamed or gzipped download is still read. Gzip is recognised by its magic bytes, not its name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import IO

from corpora.errors import CorpusInputError

GZIP_MAGIC = b"\x1f\x8b"

FORMATS = ("xml", "medline", "csv", "tsv", "xlsx", "jsonl", "store", "hf-disk")

#: Exceptions a damaged gzip stream raises while being read.
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

_SUFFIXES = {
    ".xml": "xml",
    ".nbib": "medline",
    ".medline": "medline",
    ".ris": "medline",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".xlsx": "xlsx",
    ".xlsm": "xlsx",
    ".jsonl": "jsonl",
}


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def open_binary(path: str | Path) -> IO[bytes]:
    """Open ``path`` for reading bytes, transparently decompressing gzip; an empty file is an error."""
    path = Path(path)
    if not path.exists():
        raise CorpusInputError(path, "no such file")
    if path.is_dir():
        raise CorpusInputError(path, "is a folder, expected a file")
    if path.stat().st_size == 0:
        raise CorpusInputError(path, "file is empty")
    if is_gzip(path):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _sniff(path: Path) -> bytes:
    try:
        with open_binary(path) as fh:
            return fh.read(4096)
    except GZIP_ERRORS as exc:
        raise CorpusInputError(path, f"damaged gzip stream ({exc})") from exc


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS` for ``path``; raises a clear error when the format cannot be told."""
    path = Path(path)
    if path.is_dir():
        if (path / "records.jsonl").is_file():
            return "store"
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return "hf-disk"
        if (path / "dataset" / "dataset_dict.json").is_file():
            return "hf-disk"
        raise CorpusInputError(
            path, "folder is neither a fetch store (records.jsonl) nor a saved Hugging Face dataset"
        )
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    head = _sniff(path).lstrip(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"<"):
        return "xml"
    if head.startswith(b"PMID-") or b"\nPMID-" in head:
        return "medline"
    if head.startswith(b"PK"):
        return "xlsx"
    if b"\t" in head.split(b"\n", 1)[0]:
        return "tsv"
    if b"," in head.split(b"\n", 1)[0]:
        return "csv"
    raise CorpusInputError(
        path, "cannot tell the format: expected PubMed XML, MEDLINE text, CSV/TSV/XLSX or JSONL"
    )
