"""Exclusive file locks for things two clap processes could share: an output folder, a GGUF conversion.

Why ``fcntl.flock``: the kernel releases the lock when its holder dies (even on ``kill -9``), so a lock file left
behind by a crashed run is never mistaken for a live one and is simply taken over. The file records who holds it
(PID, host, start time) so that a refused run can say whom it is waiting for.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clap.errors import ClapError


class LockHeld(ClapError):
    """Another live process holds the lock."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(path: Path) -> str:
    """``pid 123 on host h since 2024-05-01 10:00:00`` (or what is known of it)."""
    info = _holder(path)
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}"


@contextmanager
def exclusive_lock(path: Path, *, wait: bool, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``wait=False`` raises :class:`LockHeld` naming the holder when the lock is taken; ``wait=True`` blocks until
    the holder finishes. The file is removed on release; because a waiter may have opened the old file just before
    that, a lock is only trusted when the locked file is still the one at ``path`` (otherwise it is retaken).
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(
                f"{what or path} is in use by {describe_holder(path)} (lock file {path}); wait for that run to "
                f"finish or choose another folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
