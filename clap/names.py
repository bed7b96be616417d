"""Names that become file or folder names: probe ids, study names, model names.

Why here: a probe id ends up in file names (``trace_<id>.png``) and a study name in a folder (``<name>-output``).
An id such as ``../../X`` or ``a/b`` would write outside the output folder or create folders in it, so such names
are refused where they are read (:func:`name_problem`, called by the spec validators, whose errors name file and
line), and every file name made from an id goes through :func:`file_stem`, which is safe for any text (results
written by older versions, frames built in Python).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

#: what a file name made from an id may keep as it is; anything else is replaced by ``_``
_SAFE = re.compile(r"[^A-Za-z0-9._+=@,-]")


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a probe or a study (it would leave or reshape the output folder), or None.

    Refused: empty or blank names, path separators (``/``, ``\\``), the path components ``.`` and ``..``, and
    control characters (NUL, newlines, ...). Spaces and other printable characters are fine."""
    if not value.strip():
        return "is empty"
    for sep in ("/", "\\"):
        if sep in value:
            return f"contains {sep!r}: it becomes part of file names, and a path separator would write outside " \
                   "the output folder or create folders in it"
    if value in (".", ".."):
        return f"is {value!r}, a path component"
    bad = next((c for c in value if unicodedata.category(c).startswith("C")), None)
    if bad is not None:
        return f"contains the control character {bad!r}"
    return None


def file_stem(value: object) -> str:
    """A file name part for an id: the id itself when it is plain (letters, digits, ``._+=@,-``), else its plain
    characters with the others replaced by ``_`` and a short digest of the id appended, so that two ids never
    share a file and no id reaches outside the folder (``../x`` -> ``.._x-<digest>``, never ``..``)."""
    text = str(value)
    safe = _SAFE.sub("_", text)
    if safe == text and safe not in ("", ".", ".."):
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[:80]}-{digest}"
