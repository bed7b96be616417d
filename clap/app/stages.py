"""Stage bookkeeping for ``clap run``: input hashes, the ``stages.json`` record, and the output-folder lock.

A stage is *up to date* when ``stages.json`` records it as done with the same hash. The hash covers everything the
stage's outputs depend on: its section of the study file, the content of its input files, the hashes of the stages
it reads from, and the clap version. A stage's record is written only after its outputs are complete, and the file
is replaced atomically, so an interrupted run never marks unfinished work as done.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clap.contract import atomic_write_text
from clap.errors import ClapError

STAGES_FILE = "stages.json"
LOCK_FILE = ".clap-run.lock"
FORMAT = 1
_CHUNK = 1 << 20
#: (path, size, mtime_ns) -> sha256, so a file read by several stages of one run is hashed once.
_FILE_MEMO: dict[tuple[str, int, int], str] = {}


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value in canonical form (sorted keys), so equal inputs hash equal."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (content, not timestamps: touching a file without changing it is no change)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ClapError(f"{path}: cannot read input file ({exc.strerror})") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_MEMO:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                sha.update(block)
        _FILE_MEMO[key] = sha.hexdigest()
    return _FILE_MEMO[key]


def tree_digest(path: str | Path) -> str:
    """sha256 over a file, or over every file of a folder (relative names and contents; hidden entries skipped)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        raise ClapError(f"{path}: input not found")
    entries = []
    for child in sorted(path.rglob("*")):
        rel = child.relative_to(path)
        if child.is_file() and not any(part.startswith(".") for part in rel.parts):
            entries.append((rel.as_posix(), file_digest(child)))
    return digest(entries)


class StageStore:
    """``<out>/stages.json``: per stage its hash, status, duration and finishing time."""

    def __init__(self, out: Path):
        self.path = Path(out) / STAGES_FILE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.exists() and not self.path.is_file():
            raise ClapError(f"{self.path}: is a folder, not clap's stage record; move it away (clap run writes its "
                            "record there)")
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8
                raise ClapError(f"{self.path}: unreadable stage record ({exc}); "
                                "delete it to rerun every stage") from None
            if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
                raise ClapError(f"{self.path}: not a clap stage record; delete it to rerun every stage")
            bad = [name for name, record in data["stages"].items() if not isinstance(record, dict)]
            if bad:
                raise ClapError(f"{self.path}: stage record(s) {', '.join(map(repr, bad))} are not JSON objects "
                                "(not a clap stage record); delete the file to rerun every stage")
            self.stages = data["stages"]

    def is_done(self, name: str, stage_hash: str) -> bool:
        record = self.stages.get(name)
        return bool(record) and record.get("status") == "done" and record.get("hash") == stage_hash

    def mark_running(self, name: str, stage_hash: str) -> None:
        """Forget a stage's earlier completion before its outputs are rewritten."""
        self.stages[name] = {"hash": stage_hash, "status": "running", "started": _now()}
        self.save()

    def mark_done(self, name: str, stage_hash: str, seconds: float, outputs: list[str]) -> None:
        self.stages[name] = {"hash": stage_hash, "status": "done", "seconds": round(seconds, 3), "finished": _now(),
                             "outputs": outputs}
        self.save()

    def save(self) -> None:
        """Write to a temporary name and rename, so a reader never sees half a file."""
        from clap import __version__

        atomic_write_text(self.path, json.dumps({"format": FORMAT, "clap": __version__, "stages": self.stages},
                                                indent=2, sort_keys=True))


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder: two runs writing one folder would mix their stages. The folder
    is proved writable first; a second run stops at once naming the first (:func:`clap.locks.exclusive_lock`)."""
    from clap.locks import exclusive_lock
    from clap.outputs import prepare_output_dir

    prepare_output_dir(out, holds="a study's stages are written into a folder")
    with exclusive_lock(out / LOCK_FILE, wait=False, what=f"output folder {out} (another `clap run`)"):
        yield


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
