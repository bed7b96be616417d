"""Opening corpus inputs and telling their formats apart.

Formats are recognised by name first (``.xml[.gz]``, ``.txt``/``.nbib``/``.medline``, ``.csv``, ``.tsv``,
``.xlsx``, ``.jsonl``) and by content when the name says nothing (XML starts with ``<``, MEDLINE text with
``PMID-``), so a renamed or gzipped download is still read. Gzip is recognised by its magic bytes, not its name.
"""

from __future__ import annotations

import gzip
import io
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


class GzipStream(io.RawIOBase):
    """Streaming gzip decompression that hands out every byte it could decompress before failing.

    ``gzip.GzipFile`` discards the output of the read call in which it finds the stream cut short, so a parser
    reading in 32 KB chunks would lose the last complete records of a truncated download. Here decompressed data
    is always delivered first and ``EOFError`` is raised only when more is asked for. Concatenated gzip members
    (as ``cat a.gz b.gz`` produces) are read one after the other.
    """

    CHUNK = 1 << 16

    def __init__(self, path: Path):
        super().__init__()
        self._fh = open(path, "rb")
        self._decoder: zlib._Decompress | None = zlib.decompressobj(wbits=31)
        self._buf = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while self._pos >= len(self._buf) and not self._done:
            self._buf, self._pos = b"", 0
            if self._decoder is not None and self._decoder.eof:
                rest, self._decoder = self._decoder.unused_data, None
                if rest.strip(b"\0"):
                    self._decoder = zlib.decompressobj(wbits=31)
                    self._buf = self._decoder.decompress(rest)
                continue
            chunk = self._fh.read(self.CHUNK)
            if self._decoder is None:  # between members
                if not chunk:
                    self._done = True
                elif chunk.strip(b"\0"):
                    self._decoder = zlib.decompressobj(wbits=31)
                    self._buf = self._decoder.decompress(chunk)
                continue
            if not chunk:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            self._buf = self._decoder.decompress(chunk)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        self._fill()
        n = min(len(buffer), len(self._buf) - self._pos)
        buffer[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


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
        return GzipStream(path)
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
