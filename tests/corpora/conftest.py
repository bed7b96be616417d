"""Fixtures for the corpus tests: the real PubMed files, counts taken from them by plain regex (independently of
the parsers under test), and a loopback HTTP server that speaks enough of the E-utilities protocol."""

from __future__ import annotations

import gzip
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from corpus_testutil import ARTICLE, FakeEutils, article_pmid, handler_for, regex_corpus


@pytest.fixture(scope="session")
def pubmed_dir(shared_data: Path) -> Path:
    path = shared_data / "pubmed"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def article_chunks(pubmed_dir: Path) -> list[bytes]:
    """Real <PubmedArticle> elements: every efetch sample, then the first records of the 2021 update file."""
    chunks: list[bytes] = []
    for path in sorted((pubmed_dir / "efetch-xml").glob("*.xml")):
        chunks.extend(m.group(0) for m in ARTICLE.finditer(path.read_bytes()))
    with gzip.open(pubmed_dir / "pubmed21n1298.xml.gz") as fh:
        head = fh.read(9_000_000)
    chunks.extend(m.group(0) for m in ARTICLE.finditer(head))
    unique: dict[str, bytes] = {}  # a search result lists each PMID once
    for chunk in chunks:
        unique.setdefault(article_pmid(chunk), chunk)
    return list(unique.values())[:500]


@pytest.fixture
def eutils_server(article_chunks: list[bytes]):
    """Start a fake E-utilities server on 127.0.0.1 (any free port); yields the FakeEutils to configure."""
    fake = FakeEutils(articles=list(article_chunks))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    server.daemon_threads = True
    server.handle_error = lambda request, address: None  # a stalled reply to a client that gave up is expected
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/entrez/eutils/"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    """Injected in place of time.sleep: records the delays instead of waiting them."""
    return []


@pytest.fixture(scope="session")
def big_files(pubmed_dir: Path) -> list[Path]:
    return [pubmed_dir / "pubmed20n0014.xml.gz", pubmed_dir / "pubmed21n1298.xml.gz"]


@pytest.fixture(scope="session")
def big_files_truth(big_files: list[Path]) -> dict:
    """What the two large files hold, read with regular expressions over the raw XML (not the parsers).

    Returns records read, distinct PMIDs, and the epilepsy corpus (PMID -> title + abstract) after applying
    DeleteCitation and later-copy-wins in file order.
    """
    return regex_corpus(big_files)
