"""``clap corpus fetch``: a PubMed query into a resumable local store, batch by batch.

One run: ``esearch`` (history server) -> for each batch ``efetch`` -> append the batch's new PMIDs to the store
(fsync) -> advance the checkpoint. The checkpoint never runs ahead of the data, so an interrupted run loses at most
the batch in flight, which the rerun fetches again (the store drops the PMIDs it already has).

A rerun re-runs ``esearch`` (history sessions expire) and continues at the saved offset when the result set still
has the same size; if the size changed, offsets no longer mean the same records, so it starts again from offset 0:
nothing already stored is written twice. Because even a same-sized result set may come back in another order,
every run ends with a check against the search's PMID list (``rettype=uilist``, one request per 10,000) and
fetches by PMID whatever the pages missed, so nothing is skipped either.

PubMed's history server serves at most the first 10,000 records of a search; larger searches are capped with a
warning. Fetch them as several date ranges (``--mindate``/``--maxdate``) into the same store: each query keeps
its own checkpoint and the store de-duplicates across them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from corpora.errors import CorpusError, EutilsError
from corpora.eutils import (
    PUBMED_HISTORY_LIMIT,
    EutilsClient,
    HistoryExpired,
    SearchResult,
)
from corpora.store import RecordStore

log = logging.getLogger(__name__)

DEFAULT_QUERY = "epilepsy OR seizure OR EEG"
DEFAULT_BATCH = 200
#: The date forms E-utilities accepts for mindate/maxdate.
DATE = re.compile(r"\d{4}(/\d{1,2}(/\d{1,2})?)?")


@dataclass(frozen=True)
class FetchQuery:
    """What to fetch: the search term, an optional publication-date range and an optional record limit."""

    term: str = DEFAULT_QUERY
    mindate: str | None = None
    maxdate: str | None = None
    datetype: str = "pdat"
    limit: int | None = None

    def signature(self) -> str:
        """A stable key for this query's checkpoint (several queries may share one store)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class FetchReport:
    """The outcome of one ``fetch`` call."""

    count: int           # esearch Count
    target: int          # records this run aimed for (Count, capped by limit and the history limit)
    started_at: int      # offset the run resumed from
    added: int           # new PMIDs written to the store
    returned: int        # records efetch returned in this run (including ones already stored)
    missing: int         # PMIDs of the search still not in the store (after the verification pass)
    recovered: int       # records the verification pass fetched by PMID (missed by paging)
    store_size: int      # PMIDs in the store afterwards
    requests: int        # HTTP requests sent, retries included


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fetch(
    store_dir: str | Path,
    query: FetchQuery,
    client: EutilsClient,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    verify: bool = True,
) -> FetchReport:
    """Fetch ``query`` into the store at ``store_dir``, resuming a previous run of the same query.

    With ``verify`` (the default) the run ends by comparing the store with the search's PMID list and fetching
    any PMID that paging missed, so the store is complete even if the result order changed between runs.

    Parameters
    ----------
    store_dir : str or Path
        The append-only JSONL store (created if missing); several queries may share one.
    query : FetchQuery
        Search term, optional publication-date range and record limit.
    client : corpora.eutils.EutilsClient
        The E-utilities client (rate limits, ``email`` / ``api_key`` identification, retries).
    batch_size : int, default 200 (DEFAULT_BATCH)
        Records per efetch request, 1 to 10000.
    progress : bool, default True
        Show a progress bar.
    verify : bool, default True
        Fetch by PMID whatever paging missed (see above).

    Returns
    -------
    FetchReport
        ``count`` (the search's), ``target``, ``started_at``, ``added``, ``returned``, ``missing``, ``recovered``,
        ``store_size`` and ``requests``.

    Raises
    ------
    corpora.errors.CorpusError
        Bad arguments (batch size, limit, dates) or a request that still fails after the retries.

    Examples
    --------
    >>> from corpora.eutils import EutilsClient
    >>> from corpora.fetch import FetchQuery, fetch
    >>> client = EutilsClient(email="you@example.org")  # doctest: +SKIP
    >>> report = fetch("store/", FetchQuery("epilepsy OR seizure", mindate="2020", limit=500), client)  # doctest: +SKIP
    >>> report.store_size  # doctest: +SKIP
    500
    """
    if batch_size < 1 or batch_size > 10_000:
        raise CorpusError(f"batch size must be between 1 and 10000, got {batch_size}")
    if query.limit is not None and query.limit < 0:
        raise CorpusError(f"record limit must be >= 0, got {query.limit}")
    for flag, value in (("--mindate", query.mindate), ("--maxdate", query.maxdate)):
        if value is not None and not DATE.fullmatch(value):
            raise CorpusError(f"{flag} {value!r} is not a date: use YYYY, YYYY/MM or YYYY/MM/DD")
    with client.redact.scope():
        return _fetch(store_dir, query, client, batch_size, progress, verify)


def _fetch(store_dir: str | Path, query: FetchQuery, client: EutilsClient, batch_size: int, progress: bool,
           verify: bool) -> FetchReport:
    key = query.signature()
    with RecordStore(store_dir) as store:
        state = store.load_state()
        previous = state["searches"].get(key)

        def search() -> SearchResult:
            return client.esearch(query.term, mindate=query.mindate, maxdate=query.maxdate,
                                  datetype=query.datetype)

        result = search()
        target = _capped_target(result.count, query.limit)
        start = _resume_point(previous, query.term, result.count, target)
        entry = {
            "query": asdict(query),
            "count": result.count,
            "target": target,
            "next_retstart": start,
            "done": start >= target,
            "started": previous.get("started", _now()) if previous else _now(),
        }
        state["searches"][key] = entry
        store.save_state(state)

        added = returned = short = 0
        retstart = start
        try:
            with tqdm(total=target, initial=start, unit="rec", desc="fetch", disable=not progress) as bar:
                while retstart < target:
                    size = min(batch_size, target - retstart)
                    records, result = _efetch_page(client, search, result, query.term, entry["count"], retstart,
                                                   size)
                    for record in records:
                        record.source_file = "efetch"
                    added += store.add(records)
                    returned += len(records)
                    if len(records) < size:
                        short += size - len(records)
                        log.warning("efetch returned %d of %d records at offset %d",
                                    len(records), size, retstart)
                    retstart += size
                    entry.update(next_retstart=retstart, done=retstart >= target, updated=_now())
                    store.save_state(state)
                    bar.update(size)
                    bar.set_postfix(stored=len(store))
        except EutilsError as exc:
            raise EutilsError(f"{exc}; {len(store)} records are stored in {store.directory}, rerun the same "
                              f"command to resume at record {retstart}") from exc
        recovered, missing = 0, short
        if verify and target:
            recovered, missing = _verify(client, search, result, store, target, batch_size)
            added += recovered
        entry.update(done=True, updated=_now(), missing=missing)
        store.save_state(state)
        return FetchReport(count=result.count, target=target, started_at=start, added=added,
                           returned=returned, missing=missing, recovered=recovered, store_size=len(store),
                           requests=client.requests_sent)


def _capped_target(count: int, limit: int | None) -> int:
    """How many records this run aims for: the search's count, capped by the user's limit and PubMed's history cap."""
    target = count if limit is None else min(count, limit)
    if target > PUBMED_HISTORY_LIMIT:
        log.warning("%d records match; PubMed serves only the first %d of a search; narrow it with "
                    "--mindate/--maxdate and fetch each range into the same store",
                    target, PUBMED_HISTORY_LIMIT)
        target = PUBMED_HISTORY_LIMIT
    return target


def _resume_point(previous: dict | None, term: str, count: int, target: int) -> int:
    """The offset to continue at: the saved one only if the result set kept its size (else offsets moved)."""
    if previous and previous.get("count") == count and previous.get("target") == target:
        start = min(int(previous.get("next_retstart", 0)), target)
        if start:
            log.info("resuming %r at record %d of %d", term, start, target)
        return start
    if previous:
        log.warning("%r now matches %d records (was %d); fetching again from the start, "
                    "records already stored are kept and not duplicated",
                    term, count, previous.get("count"))
    return 0


def _efetch_page(client: EutilsClient, search, result: SearchResult, term: str, count: int, retstart: int,
                 size: int) -> tuple[list, SearchResult]:
    """One page of records, searching again once if the history session expired (returns the search used)."""
    try:
        return client.efetch(result, retstart, size), result
    except HistoryExpired:
        log.info("history session expired; searching again")
        result = search()
        if result.count != count:
            raise CorpusError(
                f"{term!r} changed while fetching ({count} -> {result.count} "
                "records); rerun the fetch to start over (stored records are kept)") from None
        return client.efetch(result, retstart, size), result


def _verify(client: EutilsClient, search, result: SearchResult, store: RecordStore, target: int,
            batch_size: int) -> tuple[int, int]:
    """Check the store against the search's PMID list and fetch, by PMID, whatever paging missed.

    Paging by offset is only as stable as the server's ordering: between two runs (a resume gets a fresh history
    session) records may move, so a resumed run could skip some. The PMID list (one cheap request per 10,000)
    makes the result loss-free whatever happened. Returns (recovered, still missing).
    """
    try:
        pmids = _uids(client, result, target)
    except HistoryExpired:
        result = search()
        pmids = _uids(client, result, target)
    absent = [p for p in pmids if p not in store]
    wanted = set(absent)
    recovered = 0
    if absent:
        log.warning("%d PMIDs of the search are not in the store (results reordered between runs?); "
                    "fetching them by PMID", len(absent))
    for start in range(0, len(absent), batch_size):
        records = client.efetch_ids(absent[start:start + batch_size])
        for record in records:
            record.source_file = "efetch"
        recovered += store.add(r for r in records if r.pmid in wanted)
    still = sum(1 for p in pmids if p not in store)
    if still:
        log.warning("%d PMIDs of the search could not be fetched (withdrawn or not yet available?)", still)
    return recovered, still


def _uids(client: EutilsClient, result: SearchResult, target: int) -> list[str]:
    pmids: list[str] = []
    for start in range(0, target, PUBMED_HISTORY_LIMIT):
        pmids.extend(client.efetch_uids(result, start, min(PUBMED_HISTORY_LIMIT, target - start)))
    return pmids
