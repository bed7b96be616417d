"""Stage bookkeeping for ``clap run``: input hashes, the ``stages.json`` record, and the output-folder lock.

A stage is *up to date* when ``stages.json`` records it as done with the same hash and its outputs are still what
it wrote. The hash covers everything the stage's outputs depend on: its section of the study file, the content of
its input files, the hashes of the stages it reads from, and the clap version. A stage's record is written only
after its outputs are complete, and the file is replaced atomically, so an interrupted run never marks unfinished
work as done. The record lists every output file with its size and sha256: a deleted, truncated or edited output
makes the stage (and what reads it) run again instead of being reported up to date.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from clap.contract import atomic_write_text
from clap.errors import ClapError

STAGES_FILE = "stages.json"
LOCK_FILE = ".clap-run.lock"
FORMAT = 1
_CHUNK = 1 << 20
#: stat identity (path, size, mtime, inode, change time) -> sha256, so a file read by several stages of one run is
#: hashed once; the change time and inode catch edits that keep size and mtime (``cp -p``, ``touch -r``)
_FILE_MEMO: dict[tuple[str, int, int, int, int], str] = {}


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
    key = _stat_identity(path, stat)
    if key not in _FILE_MEMO:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                sha.update(block)
        _FILE_MEMO[key] = sha.hexdigest()
    return _FILE_MEMO[key]


def _stat_identity(path: Path, stat: os.stat_result) -> tuple[str, int, int, int, int]:
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def _files_under(path: Path) -> list[Path]:
    """``path`` itself, or every file in the folder ``path`` (hidden entries skipped), sorted."""
    if path.is_file():
        return [path]
    return sorted(child for child in path.rglob("*") if child.is_file()
                  and not any(part.startswith(".") for part in child.relative_to(path).parts))


def output_files(out: Path, outputs: list[Path]) -> dict[str, dict[str, Any]]:
    """Every file a stage wrote (its output files, and the files inside its output folders), keyed by its path
    relative to ``out``: size, sha256 and stat identity, so a later run can tell the outputs are unchanged."""
    files: dict[str, dict[str, Any]] = {}
    for output in outputs:
        for file in _files_under(Path(output)):
            stat = file.stat()
            files[_relative(file, out)] = {"size": stat.st_size, "sha256": file_digest(file),
                                           "stat": list(_stat_identity(file, stat)[1:])}
    return files


def outputs_problem(out: Path, record: dict[str, Any]) -> str | None:
    """Why a finished stage's outputs are no longer what it wrote (missing, other size, other bytes), or None.

    Files whose stat identity is unchanged are not read again; any other file is hashed and compared."""
    files = record.get("files")
    if not isinstance(files, dict):  # a record of an older clap: the outputs' existence is all it says
        missing = [p for p in record.get("outputs") or [] if not (out / p).exists()]
        return f"{missing[0]} is missing" if missing else None
    if not files and record.get("outputs"):
        return f"{record['outputs'][0]} held no files"
    for name, expected in sorted(files.items()):
        path = out / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if not isinstance(expected, dict) or stat.st_size != expected.get("size"):
            return f"{name} changed size"
        if list(_stat_identity(path, stat)[1:]) == expected.get("stat"):
            continue
        if file_digest(path) != expected.get("sha256"):
            return f"{name} changed"
    return None


def _relative(path: Path, out: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


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

    def mark_done(self, name: str, stage_hash: str, seconds: float, outputs: list[Path]) -> None:
        """Record a finished stage with its outputs (paths relative to the output folder) and every file in them."""
        out = self.path.parent
        self.stages[name] = {"hash": stage_hash, "status": "done", "seconds": round(seconds, 3), "finished": _now(),
                             "outputs": [_relative(p, out) for p in outputs], "files": output_files(out, outputs)}
        self.save()

    def outputs_problem(self, name: str) -> str | None:
        """Why the finished stage ``name``'s outputs are not what it wrote, or None (see :func:`outputs_problem`)."""
        return outputs_problem(self.path.parent, self.stages.get(name) or {})

    def save(self) -> None:
        """Write to a temporary name and rename, so a reader never sees half a file."""
        from clap import __version__

        atomic_write_text(self.path, json.dumps({"format": FORMAT, "clap": __version__, "stages": self.stages},
                                                indent=2, sort_keys=True))


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder: two runs writing one folder would mix their stages.

    The lock file (``<out>/.clap-run.lock``) records the holder and is removed when the run ends, still under the
    lock (:func:`clap.locks.exclusive_lock`), so a finished run leaves nothing behind and a refused run names the
    run it waits for. The folder is proved writable first (a file in its place or a read-only folder is one line).
    """
    from clap.locks import LockHeld, describe_holder, exclusive_lock
    from clap.outputs import prepare_output_dir

    prepare_output_dir(out, holds="a study's stages are written into a folder")
    path = out / LOCK_FILE
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path, wait=False, what=f"output folder {out}"))
        except LockHeld:
            raise ClapError(f"{out}: another `clap run` is writing to this folder ({describe_holder(path)}); "
                            "wait for it or use another -o") from None
        yield


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
