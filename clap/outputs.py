"""Output folders and files of the commands: proved writable before work starts, and cleaned of what an earlier run
of the same command wrote that this one no longer writes.

Why here, on the ground floor: ``clap patch``, ``analyze``, ``report``, ``compare``, ``run`` and ``probes check``
all take ``-o``; a typo that names a file, or a folder that cannot be written, must end every one of them with the
same one-line error (never a traceback from ``mkdir`` or ``rename``, never after minutes of work). And a folder that
a command rewrites must not keep files of an earlier run that look current (the figures of a slice the results no
longer hold): :func:`prune_outputs` removes exactly the files the earlier run recorded and this one did not write,
never a file it did not write itself.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from clap.errors import ClapError


def os_error_text(exc: OSError) -> str:
    """``<file>: <reason>`` of an ``OSError``, with what to do for a full disk or a permission problem."""
    where = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space and rerun", errno.EDQUOT: "free some space and rerun",
            errno.EACCES: "check the folder's permissions", errno.EROFS: "choose a writable folder",
            errno.EPERM: "check the folder's permissions"}.get(exc.errno)
    return (f"{where}: {reason}" if where else reason) + (f" ({hint})" if hint else "")


def prepare_output_dir(out_dir: str | Path, *, what: str = "output folder", holds: str = "") -> Path:
    """Create ``out_dir`` and prove it writable (a temporary file is created and removed there: permission bits
    say nothing about read-only file systems or root); a file in its place, a file among its parents or a folder
    that cannot be written is a :class:`ClapError` naming it. ``holds`` says what is written into the folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ClapError(f"{what} {out_dir} is an existing file; " + (f"{holds}: " if holds else "")
                        + "choose another path")
    _writable_folder(out_dir, f"{what} {out_dir}")
    return out_dir


def prepare_output_file(path: str | Path, *, what: str) -> Path:
    """Check that the file ``path`` can be written: no folder in its place, its folder created and writable."""
    path = Path(path)
    if path.is_dir():
        raise ClapError(f"{what} {path} is a folder; give a file name")
    _writable_folder(path.parent, f"{what} {path}")
    return path


def _writable_folder(folder: Path, named: str) -> None:
    """Create ``folder`` (with its parents) and write a temporary file there; errors start with ``named``."""
    for parent in (folder.absolute(), *folder.absolute().parents):  # the nearest that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ClapError(f"{named} cannot be created: {parent} is a file")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ClapError(f"{named} is not writable: {exc.strerror or exc}") from None


def prune_outputs(out_dir: str | Path, written: Iterable[str | Path], manifest: str) -> list[Path]:
    """Record ``written`` (paths of files inside ``out_dir``, as opened) in the hidden manifest ``out_dir/manifest``,
    and remove the files the previous manifest listed that are not written now; return the removed paths.

    Only files named in the previous manifest are ever removed (never another file in the folder), and folders are
    removed only when that left them empty. The manifest is replaced atomically after the removals.
    """
    from clap.contract import atomic_write_text

    root = Path(out_dir)
    now = sorted({_inside(root, Path(p)) for p in written} - {None})
    record = root / manifest
    try:
        before = json.loads(record.read_text(encoding="utf-8")).get("files", [])
        before = [p for p in before if isinstance(p, str)]
    except (OSError, ValueError, AttributeError):
        before = []
    removed = []
    for name in sorted(set(before) - set(now)):
        path = root / name
        if _inside(root, path) != name or not path.is_file() or path.is_symlink():
            continue  # never follow a manifest out of the folder, never remove folders or links
        path.unlink()
        removed.append(path)
        for parent in path.parents:
            if parent == root or root not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:
                break
    atomic_write_text(record, json.dumps({"files": now}, indent=1) + "\n")
    return removed


def _inside(root: Path, path: Path) -> str | None:
    """``path`` (absolute, or relative to the working folder) relative to ``root`` (POSIX), or None outside it."""
    try:
        return Path(os.path.normpath(path.absolute())).relative_to(Path(os.path.normpath(root.absolute()))).as_posix()
    except ValueError:
        return None
