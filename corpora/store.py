"""Append-only, resumable local store of fetched citations, keyed by PMID.

Layout of a store folder::

    <store>/records.jsonl     one PubmedRecord per line (JSON), appended batch by batch, fsync'ed
    <store>/fetch_state.json  per-search progress: query, WebEnv/QueryKey, Count, next retstart, done
    <store>/.lock             held while a fetch writes, so two fetches cannot interleave lines

Why JSONL rather than a database: it is append-only by nature (a crash can only tear the last line), readable with
any tool, and ``clap corpus build <store>`` reads it like any other input. Opening a store re-reads the PMIDs
already present and cuts off a torn last line, so a rerun after a crash or Ctrl-C continues with no duplicates and
nothing lost: the checkpoint only advances after a batch's records are on disk, and a batch re-fetched after a crash
is de-duplicated here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from clap.contract import atomic_write_text
from corpora.errors import CorpusError, CorpusInputError, ProblemLog
from corpora.records import PubmedRecord

log = logging.getLogger(__name__)

RECORDS = "records.jsonl"
STATE = "fetch_state.json"
LOCK = ".lock"


def iter_jsonl(path: str | Path, problems: ProblemLog | None = None, source: str | None = None
               ) -> Iterator[PubmedRecord]:
    """Stream records from a JSONL file (a store's ``records.jsonl`` or a built corpus's split files)."""
    path = Path(path)
    name = source or path.name
    problems = problems if problems is not None else ProblemLog()
    if path.stat().st_size == 0:
        raise CorpusInputError(name, "file is empty")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                if not isinstance(data, dict) or not str(data.get("pmid", "")).isdigit():
                    raise ValueError("expected an object with a numeric 'pmid'")
                record = PubmedRecord.from_dict(data)
            except (ValueError, TypeError) as exc:
                problems.report(CorpusInputError(name, f"bad JSON record: {exc}", line=lineno))
                continue
            yield record


class RecordStore:
    """Append-only JSONL of records; a PMID is written again only as a higher ``version``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CorpusError(f"{self.directory}: exists and is not a folder; choose another store folder")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CorpusError(f"{self.directory}: cannot create the store folder ({exc.strerror or exc})") from exc
        self.path = self.directory / RECORDS
        self.versions: dict[str, int] = {}
        self._lock: IO[str] | None = None
        self._recover(repair=False)

    def _recover(self, repair: bool = True) -> None:
        """Load the PMIDs on disk; cut a torn final line left by a crash mid-write.

        Only a writer holding the lock repairs (``repair=True``): a torn tail may be another fetch's line in
        flight, which a reader must leave alone."""
        self.versions = {}
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    break  # torn tail: the batch it belonged to was never checkpointed
                try:
                    data = json.loads(raw)
                except ValueError as exc:
                    rest = fh.read()
                    if rest.strip():
                        raise CorpusInputError(self.path, f"store line is not a JSON record ({exc})",
                                               line=lineno) from exc
                    break  # garbage at the very end: what a crash during an append can leave
                try:  # well-formed JSON is never a crash's leftover: a bad field is reported, never cut off
                    pmid = str(data["pmid"])
                    version = int(data.get("version") or 1)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise CorpusInputError(self.path, f"store line is not a record ({type(exc).__name__}: {exc}); "
                                           "fix or remove it", line=lineno) from exc
                self.versions[pmid] = max(self.versions.get(pmid, 0), version)
                good_end = fh.tell()
        if repair and good_end < self.path.stat().st_size:
            log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                        self.path, self.path.stat().st_size - good_end)
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)

    def __len__(self) -> int:
        return len(self.versions)

    def __contains__(self, pmid: object) -> bool:
        return pmid in self.versions

    @property
    def pmids(self) -> set[str]:
        return set(self.versions)

    def add(self, records: Iterable[PubmedRecord]) -> int:
        """Append the records not yet stored (or stored as a lower version); durable on return. Returns how many."""
        lines = []
        for record in records:
            if self.versions.get(record.pmid, 0) >= record.version:
                continue
            self.versions[record.pmid] = record.version
            lines.append(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        if lines:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
        return len(lines)

    def __iter__(self) -> Iterator[PubmedRecord]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return iter(())
        return iter_jsonl(self.path, source=str(self.path))

    # -- progress checkpoints --------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.directory / STATE

    def load_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"searches": {}}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.setdefault("searches", {}), dict):
                raise ValueError("expected an object with a 'searches' object")
        except ValueError as exc:
            raise CorpusInputError(self.state_path, f"checkpoint is not valid ({exc}); "
                                   "delete it to restart the fetch (stored records are kept)") from exc
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        """Write the checkpoint atomically (temp file + rename) so a crash leaves the old or the new one."""
        atomic_write_text(self.state_path, json.dumps(state, indent=2, sort_keys=True))

    # -- exclusive writer --------------------------------------------------------------------------------------

    def __enter__(self) -> RecordStore:
        self._lock = open(self.directory / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock.close()
            self._lock = None
            raise CorpusError(f"{self.directory}: another fetch is writing to this store") from exc
        self._recover(repair=True)  # now that no one else writes, a torn tail is a crash's leftover
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None
