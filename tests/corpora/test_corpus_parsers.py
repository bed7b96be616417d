"""The streaming parsers on every real file in ../shared/data/pubmed, checked against regex readings of the raw
files, plus the bad-input errors they must give."""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import pytest
from corpus_testutil import ARTICLE, reference_fields

from corpora.errors import CorpusInputError, ProblemLog
from corpora.parse_medline import iter_medline
from corpora.parse_xml import iter_xml, iter_xml_bytes
from corpora.readers import iter_inputs
from corpora.records import Deletion, PubmedRecord

MEDLINE_CITATION = re.compile(rb"<MedlineCitation [^>]*>.*?</MedlineCitation>", re.S)
FIELDS = ("pmid", "title", "abstract", "year", "mesh_terms", "keywords")


def records(events) -> list[PubmedRecord]:
    return [e for e in events if isinstance(e, PubmedRecord)]


def as_fields(record: PubmedRecord) -> dict:
    return {f: getattr(record, f) for f in FIELDS}


def test_legacy_medline_xml_matches_regex_reading(pubmed_dir):
    path = pubmed_dir / "medline16n0902.xml.gz"
    raw = gzip.open(path).read()
    expected = [reference_fields(c) for c in MEDLINE_CITATION.findall(raw)]
    assert len(expected) == 604
    events = list(iter_xml(path))
    got = records(events)
    assert [as_fields(r) for r in got] == expected
    deleted = re.findall(rb"<PMID[^>]*>(\d+)</PMID>", re.search(rb"<DeleteCitation>.*?</DeleteCitation>", raw,
                                                                re.S).group(0))
    assert [e.pmid for e in events if isinstance(e, Deletion)] == [d.decode() for d in deleted]
    assert all(r.source_file == "medline16n0902.xml.gz" and r.journal for r in got)


def test_structured_abstract_joined_in_order_with_labels(pubmed_dir):
    first = next(iter(records(iter_xml(pubmed_dir / "medline16n0902.xml.gz"))))
    assert first.pmid == "17942999"
    assert first.journal == "Restorative neurology and neuroscience" and first.year == 2007
    assert first.abstract.startswith("PURPOSE: An auditory electrophysiological study was conducted")
    labels = re.findall(r"\b(PURPOSE|METHODS|RESULTS|CONCLUSION|CONCLUSIONS): ", first.abstract)
    assert labels[:3] == ["PURPOSE", "METHODS", "RESULTS"]


def test_efetch_samples_match_regex_reading(pubmed_dir):
    files = sorted((pubmed_dir / "efetch-xml").glob("*.xml"))
    assert len(files) >= 6
    for path in files:
        expected = [reference_fields(c) for c in ARTICLE.findall(path.read_bytes())]
        assert expected, path
        assert [as_fields(r) for r in records(iter_xml(path))] == expected, path.name


def test_update_file_records_match_regex_reading(article_chunks):
    body = b"<PubmedArticleSet>" + b"".join(article_chunks) + b"</PubmedArticleSet>"
    got = records(iter_xml_bytes(body, "sample"))
    assert [as_fields(r) for r in got] == [reference_fields(c) for c in article_chunks]


def test_baseline_file_count_and_constant_memory(pubmed_dir):
    """30,000 citations stream through with resident memory flat (the file is ~170 MB of XML)."""
    path = pubmed_dir / "pubmed20n0014.xml.gz"
    raw = gzip.open(path).read()
    n_articles = raw.count(b"<PubmedArticle>")
    n_abstracts = len(re.findall(rb"<Abstract>\s*<AbstractText", raw))
    del raw
    assert n_articles == 30000

    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096 / 2**20

    count = with_abstract = 0
    rss = {}
    for event in iter_xml(path):
        count += 1
        with_abstract += bool(event.abstract)
        if count in (2000, 29000):
            rss[count] = rss_mb()
    assert count == n_articles and with_abstract == n_abstracts
    assert rss[29000] - rss[2000] < 40, rss


def test_medline_text_matches_its_tags(pubmed_dir):
    files = sorted((pubmed_dir / "medline-text").glob("*.txt"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        got = list(iter_medline(path))
        assert [r.pmid for r in got] == re.findall(r"^PMID- (\d+)", text, re.M), path.name
        assert [r.journal for r in got] == re.findall(r"^JT  - (.*)$", text, re.M)
        assert [len(r.mesh_terms) for r in got] == [
            len(re.findall(r"^MH  - ", block, re.M)) for block in re.split(r"\n\s*\n(?=PMID-)", text.strip())]
    first = list(iter_medline(pubmed_dir / "medline-text" / "pubmed_result1.txt"))[0]
    assert first.title == "The Bio* toolkits--a brief overview."
    assert first.abstract.startswith(
        "Bioinformatics research is often difficult to do with commercial software. The Open")
    assert first.abstract.endswith("beginning biologist programmer.")
    assert first.year == 2002
    assert "Computational Biology" in first.mesh_terms and "Programming Languages" in first.mesh_terms


def test_every_shared_file_is_readable(pubmed_dir):
    """The dispatcher reads the whole folder (formats told apart by name and content)."""
    small = [p for p in sorted(pubmed_dir.rglob("*")) if p.is_file() and p.stat().st_size < 5_000_000]
    problems = ProblemLog()
    got = records(iter_inputs(small, problems))
    expected = 604 + sum(len(ARTICLE.findall(p.read_bytes())) for p in (pubmed_dir / "efetch-xml").glob("*.xml")) \
        + sum(p.read_text().count("\nPMID- ") + p.read_text().startswith("PMID- ")
              for p in (pubmed_dir / "medline-text").glob("*.txt"))
    assert len(got) == expected and not problems.problems


# -- bad input ----------------------------------------------------------------------------------------------------


def test_not_xml(tmp_path):
    path = tmp_path / "download.xml"
    path.write_text("Service unavailable, please retry later\n")
    with pytest.raises(CorpusInputError, match=r"download\.xml, line 1: not well-formed XML"):
        list(iter_xml(path))


def test_wrong_root_element(tmp_path):
    path = tmp_path / "page.xml"
    path.write_text("<html><body><p>PubMed</p></body></html>")
    with pytest.raises(CorpusInputError, match=r"page\.xml, line 1: root element is <html>, expected "
                                               r"<PubmedArticleSet> or <MedlineCitationSet>"):
        list(iter_xml(path))
    path.write_text("<PubmedArticleSets/>")
    with pytest.raises(CorpusInputError, match=r"did you mean <PubmedArticleSet>\?"):
        list(iter_xml(path))


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["empty", "empty-gzip"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.xml.gz"
    path.write_bytes(content)
    with pytest.raises(CorpusInputError, match=r"empty\.xml\.gz: file is empty"):
        list(iter_xml(path))


def test_gzip_that_ends_early(pubmed_dir, tmp_path):
    data = (pubmed_dir / "pubmed20n0014.xml.gz").read_bytes()[:400_000]
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(data)
    # what a gzip reader can still recover, counted without the parser
    readable = zlib.decompressobj(wbits=31).decompress(data)
    complete = readable.count(b"</PubmedArticle>")
    assert 100 < complete < 30000
    with pytest.raises(CorpusInputError, match=rf"cut\.xml\.gz: gzip stream ends early or is damaged after "
                                               rf"{complete} records"):
        list(iter_xml(path))
    problems = ProblemLog(skip_bad=True)
    kept = records(iter_xml(path, problems))
    assert len(kept) == complete
    assert len(problems) == 1 and "ends early" in problems.problems[0].reason


def test_bad_record_is_named_and_skippable(article_chunks, tmp_path):
    good = article_chunks[:3]
    bad = re.sub(rb"(<MedlineCitation[^>]*>\s*<PMID[^>]*>)\d+", rb"\1PMID-MISSING", article_chunks[3], count=1)
    body = b'<?xml version="1.0"?>\n<PubmedArticleSet>\n' + b"\n".join(good + [bad] + article_chunks[4:6]) \
        + b"\n</PubmedArticleSet>\n"
    path = tmp_path / "mixed.xml"
    path.write_bytes(body)
    bad_line = body[: body.index(b"PMID-MISSING")].count(b"\n") + 1
    with pytest.raises(CorpusInputError, match=rf"mixed\.xml, line {bad_line}: <MedlineCitation> without a "
                                               r"numeric <PMID>"):
        list(iter_xml(path))
    problems = ProblemLog(skip_bad=True)
    assert len(records(iter_xml(path, problems))) == 5
    assert [p.line for p in problems] == [bad_line]


def test_truncated_xml_body(article_chunks):
    body = b"<PubmedArticleSet>" + b"".join(article_chunks[:10]) + b"</PubmedArticleSet>"
    with pytest.raises(CorpusInputError, match=r"efetch, line \d+: malformed XML after \d+ records"):
        list(iter_xml_bytes(body[: len(body) // 2], "efetch"))


def test_medline_text_bad_line(tmp_path, pubmed_dir):
    text = (pubmed_dir / "medline-text" / "pubmed_result2.txt").read_text()
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("TI  - ") and i > 40)
    lines.insert(at, "this line has no tag")
    path = tmp_path / "export.nbib"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusInputError, match=rf"export\.nbib, line {at + 1}: expected 'TAG - value'"):
        list(iter_medline(path))
    problems = ProblemLog(skip_bad=True)
    got = list(iter_medline(path, problems))
    assert len(got) == text.count("\nPMID- ") + text.startswith("PMID- ") - 1
    assert [p.line for p in problems] == [at + 1]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(CorpusInputError, match="no such file"):
        list(iter_inputs([tmp_path / "nope.xml"], ProblemLog()))
    odd = tmp_path / "notes.dat"
    odd.write_text("just some words\n")
    with pytest.raises(CorpusInputError, match=r"notes\.dat: cannot tell the format"):
        list(iter_inputs([odd], ProblemLog()))


def test_skip_bad_keeps_good_files(pubmed_dir, tmp_path):
    empty = tmp_path / "a_empty.xml"
    empty.write_bytes(b"")
    wrong = tmp_path / "b_wrong.xml"
    wrong.write_text("<eSearchResult/>")
    problems = ProblemLog(skip_bad=True)
    got = records(iter_inputs([empty, pubmed_dir / "medline16n0902.xml.gz", wrong], problems))
    assert len(got) == 604
    assert [(Path(p.source).name, p.reason.split(" (")[0]) for p in problems] == [
        ("a_empty.xml", "file is empty"),
        ("b_wrong.xml", "root element is <eSearchResult>, expected <PubmedArticleSet> or <MedlineCitationSet>"),
    ]


def test_book_articles_are_read(tmp_path):
    """NCBI Bookshelf chapters (<PubmedBookArticle>) appear in baseline files beside journal articles."""
    path = tmp_path / "books.xml"
    path.write_text(
        "<PubmedArticleSet><PubmedBookArticle><BookDocument>"
        '<PMID Version="1">20301295</PMID><Book><BookTitle book="gene">GeneReviews</BookTitle>'
        "<PubDate><Year>1993</Year></PubDate></Book>"
        "<ArticleTitle>Dravet Syndrome</ArticleTitle>"
        '<Abstract><AbstractText Label="CLINICAL CHARACTERISTICS">Seizures begin in the first year.</AbstractText>'
        '<AbstractText Label="DIAGNOSIS">Based on clinical findings.</AbstractText></Abstract>'
        "</BookDocument></PubmedBookArticle></PubmedArticleSet>"
    )
    (record,) = records(iter_xml(path))
    assert (record.pmid, record.title, record.journal, record.year) == ("20301295", "Dravet Syndrome",
                                                                        "GeneReviews", 1993)
    assert record.abstract == ("CLINICAL CHARACTERISTICS: Seizures begin in the first year. "
                               "DIAGNOSIS: Based on clinical findings.")
