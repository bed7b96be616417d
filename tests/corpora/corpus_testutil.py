"""Helpers shared by the corpus tests: regex counters over raw files (independent of the parsers under test)
and a fake E-utilities HTTP server."""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, quote_plus, urlparse

ARTICLE = re.compile(rb"<PubmedArticle>.*?</PubmedArticle>", re.S)
CITATION_PMID = re.compile(rb"<MedlineCitation[^>]*>\s*<PMID[^>]*>(\d+)</PMID>")


def article_pmid(chunk: bytes) -> str:
    return CITATION_PMID.search(chunk).group(1).decode()


def _plain(fragment: bytes | None) -> str:
    """Markup stripped, entities decoded, whitespace collapsed."""
    if fragment is None:
        return ""
    text = html.unescape(re.sub(rb"<[^>]+>", b"", fragment).decode("utf-8"))
    return " ".join(text.split())


def _first(pattern: bytes, chunk: bytes) -> bytes | None:
    match = re.search(pattern, chunk, re.S)
    return match.group(1) if match else None


def reference_fields(chunk: bytes) -> dict:
    """A citation's fields read from its raw XML with regular expressions (the tests' second opinion)."""
    abstract_block = _first(rb"<Abstract>(.*?)</Abstract>", chunk) or b""
    sections = []
    for attrs, body in re.findall(rb"<AbstractText([^>]*)>(.*?)</AbstractText>", abstract_block, re.S):
        label = _first(rb'Label="([^"]*)"', attrs)
        text = _plain(body)
        if text:
            sections.append(f"{html.unescape(label.decode()).strip()}: {text}" if label and label.strip() else text)
    title = _plain(_first(rb"<ArticleTitle[^>/]*>(.*?)</ArticleTitle>", chunk))
    if not title:
        title = _plain(_first(rb"<VernacularTitle[^>/]*>(.*?)</VernacularTitle>", chunk))
    pubdate = _first(rb"<PubDate>(.*?)</PubDate>", chunk) or b""
    year = _first(rb"<Year>(\d{4})</Year>", pubdate) or _first(rb"(\d{4})", pubdate)
    return {
        "pmid": article_pmid(chunk),
        "title": title,
        "abstract": " ".join(sections),
        "year": int(year) if year else None,
        "mesh_terms": [_plain(d) for d in re.findall(rb"<DescriptorName[^>]*>(.*?)</DescriptorName>", chunk, re.S)],
        "keywords": [k for k in (_plain(k) for k in re.findall(rb"<Keyword(?:\s[^>]*)?>(.*?)</Keyword>", chunk, re.S))
                     if k],
    }


#: The default filter terms, as the issue states them (case-insensitive, title + abstract).
TERM_PATTERNS = {
    "epilepsy": r"\bepilep(?:sy|sies|tic|tics)\b",
    "seizure": r"\bseizures?\b",
    "EEG": r"\bEEGs?\b",
    "anticonvulsant": r"\banti-?convulsants?\b",
    "antiepileptic": r"\banti-?epileptics?\b",
}


def regex_corpus(paths) -> dict:
    """Records, distinct PMIDs and the filtered corpus of PubMed XML files, by regex over the raw text."""
    import gzip

    any_term = re.compile("|".join(TERM_PATTERNS.values()), re.I)
    any_term_bytes = re.compile("|".join(TERM_PATTERNS.values()).encode(), re.I)
    alive: dict[str, str | None] = {}  # pmid -> text ("" when it cannot match), None without an abstract
    read = deletions_listed = 0
    for path in paths:
        raw = gzip.open(path).read()
        # articles and DeleteCitation blocks, in document order
        for match in re.finditer(rb"<PubmedArticle>.*?</PubmedArticle>|<DeleteCitation>.*?</DeleteCitation>", raw,
                                 re.S):
            block = match.group(0)
            if block.startswith(b"<DeleteCitation>"):
                for pmid in re.findall(rb"<PMID[^>]*>(\d+)</PMID>", block):
                    deletions_listed += 1
                    alive.pop(pmid.decode(), None)
                continue
            read += 1
            pmid = article_pmid(block)
            if b"<Abstract>" not in block:
                text = None
            elif not any_term_bytes.search(block):  # a quick no: the terms appear nowhere in the record
                text = ""
            else:
                fields = reference_fields(block)
                text = f"{fields['title']}\n\n{fields['abstract']}" if fields["abstract"] else None
            alive.pop(pmid, None)
            alive[pmid] = text
    corpus = {p: t for p, t in alive.items() if t and any_term.search(t)}
    mentions = {name: sum(len(re.findall(p, t, re.I)) for t in corpus.values()) for name, p in TERM_PATTERNS.items()}
    records = {name: sum(1 for t in corpus.values() if re.search(p, t, re.I)) for name, p in TERM_PATTERNS.items()}
    return {"read": read, "deletions_listed": deletions_listed, "distinct": len(alive), "corpus": corpus,
            "mentions": mentions, "records": records}


# -- a fake E-utilities server on 127.0.0.1 ------------------------------------------------------------------------


@dataclass
class FakeEutils:
    """Serves ``articles`` through esearch (history server) and efetch (retstart/retmax/WebEnv/query_key).

    ``faults`` maps ``(endpoint, n)`` (the n-th call to that endpoint, from 1) to an HTTP status (``"429"``,
    ``"500"``, ``"400"`` ...), ``"drop"`` (close the connection without answering), ``"stall"`` (answer after
    0.6 s), ``"truncate"`` (a 200 whose body is cut in half but whose Content-Length matches it), ``"short"``
    (Content-Length of the whole body, half of it sent, then the connection closed), ``"400key"`` (a 400 that
    echoes the request's ``api_key`` in every spelling, in its body and a header, as NCBI does for a bad key) or
    ``"errorkey"`` (a 200 whose ``<ERROR>`` echoes it). ``key_in_records`` echoes it inside a record's title
    (``True``: in the URL spellings; ``"ncr"``: as numeric character references, which the XML parser decodes).
    """

    articles: list[bytes]
    faults: dict[tuple[str, int], str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: {"esearch": 0, "efetch": 0})
    log: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    webenvs: set[str] = field(default_factory=set)
    expire_after_efetch: int | None = None  # forget all WebEnvs after this many efetch calls
    key_in_records: bool | str = False
    url: str = ""

    def body_esearch(self, params: dict[str, str]) -> bytes:
        webenv = f"MCID_fake_{self.calls['esearch']}"
        self.webenvs.add(webenv)
        return (
            b'<?xml version="1.0" encoding="UTF-8" ?>\n<!DOCTYPE eSearchResult PUBLIC "-//NLM//DTD esearch 20060628'
            b'//EN" "https://eutils.ncbi.nlm.nih.gov/eutils/dtd/20060628/esearch.dtd">\n<eSearchResult>'
            + f"<Count>{len(self.articles)}</Count><RetMax>0</RetMax><RetStart>0</RetStart>"
              f"<QueryKey>1</QueryKey><WebEnv>{webenv}</WebEnv><IdList></IdList>".encode()
            + b"<TranslationSet/><QueryTranslation>epilepsy[All Fields]</QueryTranslation></eSearchResult>\n"
        )

    def body_efetch(self, params: dict[str, str]) -> bytes:
        if "id" in params:
            wanted = set(params["id"].split(","))
            return self._article_set([a for a in self.articles if article_pmid(a) in wanted])
        if params.get("WebEnv") not in self.webenvs or params.get("query_key") != "1":
            return (b'<?xml version="1.0" encoding="UTF-8" ?>\n<eFetchResult>\n\t<ERROR>Unable to obtain query #1'
                    b"</ERROR>\n</eFetchResult>\n")
        start, size = int(params["retstart"]), int(params["retmax"])
        if params.get("rettype") == "uilist":
            return "".join(f"{article_pmid(a)}\n" for a in self.articles[start:start + size]).encode()
        return self._article_set(self.articles[start:start + size])

    def _article_set(self, articles: list[bytes]) -> bytes:
        return (
            b'<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025'
            b'//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">\n<PubmedArticleSet>\n'
            + b"\n".join(articles)
            + b"\n</PubmedArticleSet>\n"
        )

    def efetch_starts(self) -> list[int]:
        """Offsets of the record pages requested (not PMID lists, not fetches by PMID)."""
        return [int(p["retstart"]) for name, p in self.log
                if name == "efetch" and "id" not in p and p.get("rettype") != "uilist"]

    def id_fetches(self) -> list[list[str]]:
        return [p["id"].split(",") for name, p in self.log if name == "efetch" and "id" in p]


def key_echo(key: str, query: str) -> str:
    """The API key as a careless server may repeat it: raw, form-decoded, URL-encoded every way, the raw query."""
    spaced = key.replace("+", " ")
    forms = [key, spaced, quote(key, safe=""), quote_plus(key), quote(spaced, safe=""), quote_plus(spaced),
             quote(key, safe="").lower(), query]
    return "Invalid API key: " + " | ".join(forms)


def handler_for(fake: FakeEutils) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            params = {k: v[0] for k, v in parse_qs(url.query).items()}
            endpoint = url.path.rsplit("/", 1)[-1].replace(".fcgi", "")
            if endpoint not in fake.calls:
                self.send_error(404)
                return
            fake.calls[endpoint] += 1
            fake.log.append((endpoint, params))
            fault = fake.faults.get((endpoint, fake.calls[endpoint]))
            if fault == "stall":  # answer only after the client's read timeout
                time.sleep(0.6)
            if fault == "drop":
                self.close_connection = True
                return
            key = params.get("api_key", "")
            if _error_fault(self, fault, key, url.query):
                return
            body = _records_body(fake, endpoint, params, fault, key, url.query)
            self.send_response(200)
            self.send_header("Content-Type", "text/xml; charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "short":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def _error_fault(handler: BaseHTTPRequestHandler, fault: str | None, key: str, query: str) -> bool:
    """Answer an HTTP-error fault (a 400 echoing the key, or a bare status); False when the fault is none."""
    if fault == "400key":
        body = f"{{\"error\":\"{key_echo(key, query)}\"}}".encode()
        handler.send_response(400)
        handler.send_header("X-Api-Key", quote_plus(key))
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return True
    if fault is not None and fault.isdigit():
        body = f"HTTP {fault}".encode()
        handler.send_response(int(fault))
        if fault == "429":
            handler.send_header("Retry-After", "0")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return True
    return False


def _records_body(fake: FakeEutils, endpoint: str, params: dict[str, str], fault: str | None, key: str,
                  query: str) -> bytes:
    """The esearch/efetch answer with the faults that alter a 200 body (expiry, key echoes, truncation)."""
    if endpoint == "efetch" and fake.expire_after_efetch is not None \
            and fake.calls["efetch"] > fake.expire_after_efetch:
        fake.webenvs.clear()
        fake.expire_after_efetch = None
    body = fake.body_esearch(params) if endpoint == "esearch" else fake.body_efetch(params)
    if fault == "errorkey":
        body = f"<eSearchResult><ERROR>{html.escape(key_echo(key, query))}</ERROR></eSearchResult>".encode()
    if fake.key_in_records and b"</ArticleTitle>" in body:
        echo = (html.escape(key_echo(key, "")) if fake.key_in_records is True
                else "Invalid API key: " + "".join(f"&#{ord(c)};" for c in key))  # "ncr": decoded by the parser
        body = body.replace(b"</ArticleTitle>", f" {echo}</ArticleTitle>".encode(), 1)
    if fault == "truncate":
        body = body[: len(body) // 2]
    return body
