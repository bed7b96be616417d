"""Keeping a secret (the NCBI API key) out of everything a fetch prints, logs, raises or writes.

Why one filter at the boundary rather than careful call sites: the key reaches text by paths no call site controls.
NCBI echoes an invalid ``api_key`` in its error body, ``requests`` quotes the full request URL (key included,
URL-encoded) in its exception messages, urllib3 logs request lines, and a server may send the key back in any form
it decoded or re-encoded. So every byte the server sends, every error text and every log record made while a
client is in use passes through one :class:`Redactor` built from the key; nothing downstream has to remember.

A key such as ``k3y+with/slash=`` travels as ``k3y%2Bwith%2Fslash%3D`` (form encoding, which ``requests`` uses),
may come back decoded with ``+`` read as a space (``k3y with/slash=``, ``k3y%20with%2Fslash%3D``), with lower-case
hex escapes, JSON-escaped slashes or encoded twice; all of these are replaced.
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus

from clap.errors import ClapError

#: What a secret is replaced with.
MASK = "***"

_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_factory_lock = threading.Lock()


def _encodings(text: str) -> set[str]:
    """``text`` as URL encoding (path and form flavours, either hex case) may render it."""
    forms = {quote(text, safe=""), quote(text, safe="/"), quote_plus(text), quote_plus(text, safe="/")}
    forms |= {_ESCAPE.sub(lambda m: m.group(0).lower(), f) for f in forms}
    return forms


def variants(secret: str) -> set[str]:
    """Every spelling of ``secret`` worth hiding: raw, URL-encoded (once and twice), ``+`` decoded as a space,
    JSON-escaped slashes and HTML-escaped."""
    bases = {secret, secret.replace("+", " ")}
    found: set[str] = set()
    for base in bases:
        once = _encodings(base)
        found |= {base, html.escape(base), base.replace("/", "\\/")} | once
        for encoded in once:
            found |= _encodings(encoded)
    return {v for v in found if v}


class Redactor:
    """Replaces every spelling of the given secrets with :data:`MASK` in text and in raw bytes."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        spellings = sorted({v for s in secrets if s for v in variants(s)}, key=len, reverse=True)
        self._text = re.compile("|".join(map(re.escape, spellings))) if spellings else None
        self._bytes = re.compile(b"|".join(re.escape(s.encode("utf-8")) for s in spellings)) if spellings else None

    def __bool__(self) -> bool:
        return self._text is not None

    def __call__(self, text: str) -> str:
        return self._text.sub(MASK, text) if self._text is not None else text

    def redact_bytes(self, data: bytes) -> bytes:
        return self._bytes.sub(MASK.encode(), data) if self._bytes is not None else data

    def exception(self, exc: BaseException) -> str:
        """``Type: message`` of an exception, redacted (for error texts that quote a lower-level failure)."""
        return self(f"{type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Redact log records made inside, and the text of a :class:`~clap.errors.ClapError` that leaves it."""
        with self.logging():
            try:
                yield
            except ClapError as exc:
                if self and exc.args:
                    exc.args = (self(str(exc)),)
                raise

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """While active, every log record made in this process is redacted as it is created.

        A record factory rather than a handler filter: it sees records of every logger (urllib3's request lines
        included) before any handler, present or added later, and also pytest's or ``logging.lastResort``.
        """
        if not self:
            yield
            return
        with _factory_lock:
            previous = logging.getLogRecordFactory()

            def factory(*args: object, **kwargs: object) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                try:
                    message = record.getMessage()
                except (TypeError, ValueError):  # a malformed call: left to logging's own error report, redacted
                    message = f"{record.msg!s} {record.args!r}"
                record.msg, record.args = self(message), None
                if record.exc_info:
                    record.exc_text = self(logging.Formatter().formatException(record.exc_info))
                    record.exc_info = None
                if record.stack_info:
                    record.stack_info = self(record.stack_info)
                return record

            logging.setLogRecordFactory(factory)
        try:
            yield
        finally:
            with _factory_lock:
                if logging.getLogRecordFactory() is factory:
                    logging.setLogRecordFactory(previous)
