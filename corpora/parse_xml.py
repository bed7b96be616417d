"""Streaming parser for NLM PubMed XML (``PubmedArticleSet``) and legacy MEDLINE XML (``MedlineCitationSet``).

Baseline and update files hold tens of thousands of citations (hundreds of MB uncompressed), so the parser uses
``lxml.etree.iterparse`` on record end tags and clears each record (and its finished siblings) as soon as it has
been turned into a :class:`~corpora.records.PubmedRecord`: memory stays constant whatever the file size.

``<DeleteCitation>`` blocks of update files become :class:`~corpora.records.Deletion` events in stream order.
Structured abstracts (several ``<AbstractText Label=...>`` sections) are joined in order as ``LABEL: text``
separated by a space, the way PubMed's own MEDLINE export writes them, so the same citation read from XML and from
MEDLINE text yields the same abstract.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lxml import etree

from clap.errors import closest
from corpora.errors import CorpusInputError, ProblemLog
from corpora.records import Deletion, Event, PubmedRecord
from corpora.sources import GZIP_ERRORS, open_binary

#: Record-level elements to stream, per accepted root element.
RECORD_TAGS: dict[str, tuple[str, ...]] = {
    "PubmedArticleSet": ("PubmedArticle", "PubmedBookArticle", "DeleteCitation"),
    "MedlineCitationSet": ("MedlineCitation", "DeleteCitation"),
}
ROOTS = tuple(RECORD_TAGS)
SECTION_SEPARATOR = " "

_YEAR = re.compile(r"\b(1[5-9]\d\d|20\d\d)\b")


def _text(element: etree._Element | None) -> str:
    """All text inside ``element`` (inline markup such as ``<i>`` kept as text), whitespace collapsed."""
    if element is None:
        return ""
    return " ".join("".join(element.itertext()).split())


def _abstract(parent: etree._Element | None) -> str:
    """The abstract under ``parent`` (an ``Article`` or ``BookDocument``), sections joined with their labels."""
    if parent is None:
        return ""
    parts = []
    for section in parent.iterfind("Abstract/AbstractText"):
        body = _text(section)
        label = (section.get("Label") or "").strip()
        if label and body:
            parts.append(f"{label}: {body}")
        elif body:
            parts.append(body)
    return SECTION_SEPARATOR.join(parts)


def _year(*dates: etree._Element | None) -> int | None:
    """First year found among date elements: ``<Year>``, else a year inside ``<MedlineDate>`` ("1979 Jun-Jul")."""
    for date in dates:
        if date is None:
            continue
        year = date.findtext("Year")
        if year and year.strip().isdigit():
            return int(year.strip())
        match = _YEAR.search(date.findtext("MedlineDate") or "")
        if match:
            return int(match.group(1))
    return None


def _keywords(parent: etree._Element) -> list[str]:
    return [kw for kw in (_text(k) for k in parent.iterfind("KeywordList/Keyword")) if kw]


def _pmid(element: etree._Element | None, source: str, tag: str) -> tuple[str, int]:
    if element is None or not (element.text or "").strip().isdigit():
        got = "no <PMID>" if element is None else f"<PMID>{(element.text or '').strip()!r}"
        raise CorpusInputError(source, f"<{tag}> without a numeric <PMID> (found {got})",
                               line=None if element is None else element.sourceline)
    version = element.get("Version", "1")
    return element.text.strip(), int(version) if version.isdigit() else 1


def _citation(citation: etree._Element, source: str) -> PubmedRecord:
    """A ``<MedlineCitation>`` (the payload of both formats) as a record."""
    pmid, version = _pmid(citation.find("PMID"), source, "MedlineCitation")
    article = citation.find("Article")
    if article is None:
        raise CorpusInputError(source, "<MedlineCitation> without <Article>", line=citation.sourceline, record=pmid)
    journal = (
        _text(article.find("Journal/Title"))
        or _text(article.find("Journal/ISOAbbreviation"))
        or _text(citation.find("MedlineJournalInfo/MedlineTA"))
    )
    return PubmedRecord(
        pmid=pmid,
        version=version,
        title=_text(article.find("ArticleTitle")) or _text(article.find("VernacularTitle")),
        abstract=_abstract(article),
        journal=journal,
        year=_year(article.find("Journal/JournalIssue/PubDate"), article.find("ArticleDate"),
                   citation.find("DateCompleted")),
        mesh_terms=[_text(d) for d in citation.iterfind("MeshHeadingList/MeshHeading/DescriptorName")],
        keywords=_keywords(citation),
        source_file=source,
    )


def _book(element: etree._Element, source: str) -> PubmedRecord:
    """A ``<PubmedBookArticle>`` (NCBI Bookshelf chapter) as a record; its book title stands in for a journal."""
    document = element.find("BookDocument")
    if document is None:
        raise CorpusInputError(source, "<PubmedBookArticle> without <BookDocument>", line=element.sourceline)
    pmid, version = _pmid(document.find("PMID"), source, "BookDocument")
    return PubmedRecord(
        pmid=pmid,
        version=version,
        title=_text(document.find("ArticleTitle")) or _text(document.find("Book/BookTitle")),
        abstract=_abstract(document),
        journal=_text(document.find("Book/BookTitle")),
        year=_year(document.find("Book/PubDate")),
        keywords=_keywords(document),
        source_file=source,
    )


def _to_events(element: etree._Element, source: str) -> list[Event]:
    tag = element.tag
    if tag == "DeleteCitation":
        return [Deletion((p.text or "").strip(), source) for p in element.iterfind("PMID")
                if (p.text or "").strip().isdigit()]
    if tag == "PubmedArticle":
        citation = element.find("MedlineCitation")
        if citation is None:
            raise CorpusInputError(source, "<PubmedArticle> without <MedlineCitation>", line=element.sourceline)
        return [_citation(citation, source)]
    if tag == "PubmedBookArticle":
        return [_book(element, source)]
    return [_citation(element, source)]  # MedlineCitation of a MedlineCitationSet


def _root_tag(opener: Callable[[], IO[bytes]], source: str) -> str:
    """The document element's name, read from the first start event only (a few KB)."""
    with opener() as fh:
        try:
            for _event, element in etree.iterparse(fh, events=("start",), resolve_entities=False):
                return etree.QName(element).localname
        except etree.XMLSyntaxError as exc:
            if "document is empty" in str(exc).lower() or "no element found" in str(exc).lower():
                raise CorpusInputError(source, "file is empty (no XML content)") from exc
            raise CorpusInputError(source, f"not well-formed XML: {exc.msg}", line=exc.lineno) from exc
        except GZIP_ERRORS as exc:
            raise CorpusInputError(source, f"damaged gzip stream before the first element ({exc})") from exc
    raise CorpusInputError(source, "file is empty (no XML content)")


class _GuardedReader:
    """File-like wrapper that turns a damaged gzip stream into end-of-file and remembers why.

    lxml reads ahead in chunks; if the gzip error reached lxml directly, records already decompressed but not yet
    parsed would be lost. Ending the stream instead lets every complete record through before the (then expected)
    XML error, so ``--skip-bad`` keeps everything that was readable.
    """

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            return self.raw.read(size)
        except GZIP_ERRORS as exc:
            self.error = exc
            return b""


def _clear(element: etree._Element) -> None:
    """Free a finished record and every earlier sibling so the tree never grows."""
    element.clear(keep_tail=False)
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]


def _iter_stream(opener: Callable[[], IO[bytes]], source: str, problems: ProblemLog) -> Iterator[Event]:
    root = _root_tag(opener, source)
    if root not in RECORD_TAGS:
        hint = closest(root, ROOTS)
        raise CorpusInputError(
            source,
            f"root element is <{root}>, expected <PubmedArticleSet> or <MedlineCitationSet>"
            + (f" (did you mean <{hint[0]}>?)" if hint else ""),
            line=1,
        )
    count = 0
    last_line: int | None = None

    def gzip_problem(error: BaseException) -> CorpusInputError:
        near = f" (last complete record ends near line {last_line})" if last_line else ""
        return CorpusInputError(
            source, f"gzip stream ends early or is damaged after {count} records{near}: {error}")

    with opener() as raw:
        fh = _GuardedReader(raw)
        try:
            for _event, element in etree.iterparse(
                fh, events=("end",), tag=RECORD_TAGS[root], resolve_entities=False, huge_tree=True
            ):
                last_line = element.sourceline
                try:
                    events = _to_events(element, source)
                except CorpusInputError as exc:
                    problems.report(exc)
                    events = []
                _clear(element)
                count += len(events)
                yield from events
        except etree.XMLSyntaxError as exc:
            if fh.error is not None:
                problems.report(gzip_problem(fh.error))
            else:
                problems.report(CorpusInputError(
                    source, f"malformed XML after {count} records: {exc.msg}", line=exc.lineno))
            return
        if fh.error is not None:  # the XML closed properly but the gzip trailer is damaged
            problems.report(gzip_problem(fh.error))


def iter_xml(path: str | Path, problems: ProblemLog | None = None, source: str | None = None) -> Iterator[Event]:
    """Stream records and deletions from a PubMed or MEDLINE XML file (plain or gzipped)."""
    path = Path(path)
    name = source or path.name
    return _iter_stream(lambda: open_binary(path), name, problems if problems is not None else ProblemLog())


def iter_xml_bytes(data: bytes, source: str, problems: ProblemLog | None = None) -> Iterator[Event]:
    """Stream records from an in-memory document (an E-utilities ``efetch`` response)."""
    if not data.strip():
        raise CorpusInputError(source, "empty response body (no XML content)")
    return _iter_stream(lambda: io.BytesIO(data), source, problems if problems is not None else ProblemLog())
