"""A small, polite client for NCBI's E-utilities (``esearch`` with the history server, then ``efetch`` in batches).

NCBI's rules (https://www.ncbi.nlm.nih.gov/books/NBK25497/): at most 3 requests per second without an API key and
10 with one (``NCBI_API_KEY``); every request names a ``tool`` and an ``email`` (``NCBI_EMAIL``). Transient
failures are normal at NCBI's scale, so every request is retried with exponential backoff on HTTP 429 (honouring
``Retry-After``), 5xx, timeouts, dropped connections and, for ``efetch``, on a body that is truncated or not the
expected XML: a response counts only once every record in it parsed. Clock and sleep are injectable so tests run
the real retry and rate-limit code in milliseconds.

The API key is a secret that NCBI and ``requests`` both like to repeat (error bodies, exception texts quoting the
URL): the client is the boundary where a :class:`~corpora.redaction.Redactor` built from it is applied to every
body received, every error raised and every log record made during a request (see ``corpora.redaction``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

import requests
from lxml import etree

from corpora.errors import CorpusError, CorpusInputError, EutilsError, ProblemLog
from corpora.parse_xml import iter_xml_bytes
from corpora.records import PubmedRecord
from corpora.redaction import Redactor

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
RATE_WITHOUT_KEY = 3.0
RATE_WITH_KEY = 10.0
#: PubMed's history server serves only the first 10,000 records of a search.
PUBMED_HISTORY_LIMIT = 10_000
RETRY_STATUS = {429, 500, 502, 503, 504}
#: Seconds to wait for a connection, and for the server's answer (efetch of 10,000 PMIDs can take a while).
CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 120.0
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)

T = TypeVar("T")


class HistoryExpired(EutilsError):
    """The server no longer knows the WebEnv/query_key (history entries expire after some hours)."""


class _BadBody(Exception):
    """A 200 response whose body is unusable (truncated, malformed, an <ERROR> message); worth a retry."""


class RateLimiter:
    """Spaces request starts at least ``1/per_second`` apart (a minimum-interval limiter, no bursts)."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if per_second <= 0:
            raise CorpusError(f"request rate must be positive, got {per_second}")
        self.interval = 1.0 / per_second
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    def wait(self) -> None:
        now = self.clock()
        if self._next is not None and now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


@dataclass
class SearchResult:
    """What ``esearch`` with ``usehistory=y`` hands back: where the result set lives on the history server."""

    count: int
    webenv: str
    query_key: str


class EutilsClient:
    """esearch/efetch against ``base_url`` with NCBI's rate limits, identification and retries."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        email: str | None = None,
        tool: str = "clap",
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        requests_per_second: float | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        try:
            parsed = urlparse(base_url)
        except ValueError as exc:
            raise CorpusError(f"E-utilities base URL {base_url!r} is not a URL ({exc})") from None
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CorpusError(f"E-utilities base URL must be http(s)://host/..., got {base_url!r}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.api_key = api_key if api_key is not None else os.environ.get("NCBI_API_KEY") or None
        self.redact = Redactor([self.api_key])
        self.email = email if email is not None else os.environ.get("NCBI_EMAIL") or None
        self.tool = tool
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = _check_timeout(timeout)
        self.session = session or requests.Session()
        self.sleep = sleep
        limit = RATE_WITH_KEY if self.api_key else RATE_WITHOUT_KEY
        rate = min(requests_per_second, limit) if requests_per_second else limit
        self.rate = RateLimiter(rate, clock=clock, sleep=sleep)
        self.requests_sent = 0
        if not self.email:
            log.warning("no e-mail given (--email or NCBI_EMAIL); NCBI asks every E-utilities user for one")

    # -- transport -----------------------------------------------------------------------------------------------

    def _params(self, extra: dict[str, object]) -> dict[str, object]:
        params: dict[str, object] = {"db": "pubmed", "tool": self.tool}
        if self.email:
            params["email"] = self.email
        if self.api_key:
            params["api_key"] = self.api_key
        params.update({k: v for k, v in extra.items() if v is not None})
        return params

    def _failure(self, exc: requests.RequestException) -> str:
        """What went wrong with one attempt, in words (a timeout says how long it waited)."""
        connect, read = self.timeout
        if isinstance(exc, requests.ConnectTimeout):
            return f"could not connect within {connect:g} s ({self.redact.exception(exc)})"
        if isinstance(exc, requests.Timeout) or "timed out" in str(exc).lower():
            return (f"no answer within {read:g} s (read timeout; a slow server may need a longer --timeout) "
                    f"({self.redact.exception(exc)})")
        return self.redact.exception(exc)

    def _delay(self, attempt: int, retry_after: str | None = None) -> float:
        delay = min(self.max_backoff, self.backoff * (2 ** attempt))
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.max_backoff))
            except ValueError:
                pass
        return delay

    def _call(self, endpoint: str, params: dict[str, object], parse: Callable[[bytes], T], what: str = "") -> T:
        """GET ``endpoint`` and ``parse`` its body, retrying transient failures; raise EutilsError when they persist.

        Everything that leaves this method (result, exception text, log records) has passed the redactor.
        """
        with self.redact.scope():
            return self._attempts(endpoint, params, parse, what)

    def _attempts(self, endpoint: str, params: dict[str, object], parse: Callable[[bytes], T], what: str) -> T:
        url = self.base_url + endpoint
        last = "no attempt made"
        retry_after: str | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt - 1, retry_after))
            retry_after = None
            self.rate.wait()
            self.requests_sent += 1
            try:
                response = self.session.get(url, params=self._params(params), timeout=self.timeout)
                body = self.redact.redact_bytes(response.content)  # reading it may fail on a dropped connection
            except TRANSIENT_ERRORS as exc:
                last = self._failure(exc)
                log.info("%s attempt %d failed: %s", endpoint, attempt + 1, last)
                continue
            except requests.RequestException as exc:  # invalid URL, too many redirects ...: not worth a retry
                raise EutilsError(f"{url}: {self._failure(exc)}; not retrying") from None
            if response.status_code in RETRY_STATUS:
                retry_after = response.headers.get("Retry-After")
                last = f"HTTP {response.status_code}"
                log.info("%s attempt %d: %s", endpoint, attempt + 1, last)
                continue
            if response.status_code != 200:
                raise EutilsError(f"{url}: HTTP {response.status_code} ({body[:200]!r}); not retrying")
            try:
                return self.redact.value(parse(body))  # again after decoding: the parser resolves escapes
            except _BadBody as exc:
                last = f"unusable response body: {exc}"
                log.info("%s attempt %d: %s", endpoint, attempt + 1, last)
        name = endpoint.replace(".fcgi", "") + (f" {what}" if what else "")
        raise EutilsError(f"{name} failed after {self.max_retries + 1} attempts; last problem: {last}")

    # -- esearch ---------------------------------------------------------------------------------------------------

    def esearch(self, term: str, *, mindate: str | None = None, maxdate: str | None = None,
                datetype: str = "pdat") -> SearchResult:
        """Run ``term`` on the history server; returns Count, WebEnv and QueryKey (no IDs are transferred)."""
        dated = mindate is not None or maxdate is not None
        params = {
            "term": term,
            "usehistory": "y",
            "retmax": 0,
            "mindate": mindate if dated else None,
            "maxdate": (maxdate or "3000") if dated else None,
            "datetype": datetype if dated else None,
        }
        if dated and mindate is None:
            params["mindate"] = "1800"
        return self._call("esearch.fcgi", params, _parse_esearch, what=f"of {term!r}")

    # -- efetch ----------------------------------------------------------------------------------------------------

    def efetch(self, search: SearchResult, retstart: int, retmax: int) -> list[PubmedRecord]:
        """Records ``retstart .. retstart+retmax`` of a history-server result set, fully parsed."""
        params = {
            "WebEnv": search.webenv,
            "query_key": search.query_key,
            "retstart": retstart,
            "retmax": retmax,
            "retmode": "xml",
        }
        source = "efetch"
        return self._call("efetch.fcgi", params, lambda body: _parse_efetch(body, source),
                          what=f"of records {retstart}..{retstart + retmax - 1}")

    def efetch_uids(self, search: SearchResult, retstart: int, retmax: int) -> list[str]:
        """The PMIDs (only) of records ``retstart .. retstart+retmax`` of a result set (``rettype=uilist``).

        A list shorter than the result set says it must have is a cut-off body, and is asked for again.
        """
        expected = max(0, min(retmax, search.count - retstart))

        def parse(body: bytes) -> list[str]:
            pmids = _parse_uilist(body)
            if len(pmids) != expected:
                raise _BadBody(f"PMID list holds {len(pmids)} PMIDs, expected {expected}")
            return pmids

        params = {
            "WebEnv": search.webenv,
            "query_key": search.query_key,
            "retstart": retstart,
            "retmax": retmax,
            "rettype": "uilist",
            "retmode": "text",
        }
        return self._call("efetch.fcgi", params, parse, what=f"of the PMID list from {retstart}")

    def efetch_ids(self, pmids: list[str]) -> list[PubmedRecord]:
        """Records by PMID (for the few a paged fetch missed)."""
        params = {"id": ",".join(pmids), "retmode": "xml"}
        return self._call("efetch.fcgi", params, lambda body: _parse_efetch(body, "efetch"),
                          what=f"of {len(pmids)} PMIDs")


def _check_timeout(timeout: float | tuple[float, float]) -> tuple[float, float]:
    """(connect, read) seconds; a single number is the read timeout. Both must be finite and positive."""
    pair = timeout if isinstance(timeout, tuple) else (CONNECT_TIMEOUT, timeout)
    try:
        connect, read = (float(t) for t in pair)
    except (TypeError, ValueError):
        raise CorpusError(f"timeout must be a number of seconds or a (connect, read) pair, got {timeout!r}") from None
    for value in (connect, read):
        if not (math.isfinite(value) and value > 0):
            raise CorpusError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return connect, read


def _error_text(root: etree._Element) -> str:
    return "; ".join(" ".join(e.itertext()).strip() for e in root.iter("ERROR"))


def _parse_esearch(body: bytes) -> SearchResult:
    try:
        root = etree.fromstring(body, parser=etree.XMLParser(resolve_entities=False))
    except etree.XMLSyntaxError as exc:
        raise _BadBody(f"esearch response is not well-formed XML ({exc})") from exc
    count, webenv, key = root.findtext("Count"), root.findtext("WebEnv"), root.findtext("QueryKey")
    if root.tag != "eSearchResult" or count is None or not webenv or not key:
        message = _error_text(root) or f"<{root.tag}> without Count/WebEnv/QueryKey"
        raise _BadBody(f"esearch: {message}")
    return SearchResult(count=int(count), webenv=webenv.strip(), query_key=key.strip())


def _parse_uilist(body: bytes) -> list[str]:
    lines = body.decode("utf-8", "replace").split()
    if b"<ERROR>" in body[:2000]:
        try:
            text = _error_text(etree.fromstring(body, parser=etree.XMLParser(resolve_entities=False)))
        except etree.XMLSyntaxError:
            text = body[:300].decode("utf-8", "replace")
        if "unable to obtain query" in text.lower() or "webenv" in text.lower():
            raise HistoryExpired(f"efetch: {text}")
        raise _BadBody(f"efetch returned an error: {text}")
    bad = [line for line in lines if not line.isdigit()]
    if bad:
        raise _BadBody(f"PMID list holds non-numeric lines such as {bad[0][:40]!r}")
    if not body.endswith(b"\n") and lines:
        raise _BadBody("PMID list does not end with a newline (truncated?)")
    return lines


def _parse_efetch(body: bytes, source: str) -> list[PubmedRecord]:
    if b"<ERROR>" in body[:2000] and b"<PubmedArticle" not in body[:2000]:
        try:
            text = _error_text(etree.fromstring(body, parser=etree.XMLParser(resolve_entities=False)))
        except etree.XMLSyntaxError:
            text = body[:300].decode("utf-8", "replace")
        lowered = text.lower()
        if "webenv" in lowered or "query_key" in lowered or "unable to obtain query" in lowered:
            raise HistoryExpired(f"efetch: {text}")
        raise _BadBody(f"efetch returned an error: {text}")
    try:
        return [event for event in iter_xml_bytes(body, source, ProblemLog(skip_bad=False))
                if isinstance(event, PubmedRecord)]
    except CorpusInputError as exc:
        raise _BadBody(str(exc)) from exc
