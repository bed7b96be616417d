"""Keeping a secret (the NCBI API key) out of everything a fetch prints, logs, raises or writes.

Why one filter at the boundary rather than careful call sites: the key reaches text by paths no call site controls.
NCBI echoes an invalid ``api_key`` in its error body, ``requests`` quotes the full request URL (key included,
URL-encoded) in its exception messages, urllib3 logs request lines, and a server may send the key back in any form
it decoded or re-encoded. So every byte the server sends, every error text and every log record made while a
client is in use passes through one :class:`Redactor` built from the key; nothing downstream has to remember.

A key such as ``k3y+with/slash=`` travels as ``k3y%2Bwith%2Fslash%3D`` (form encoding, which ``requests`` uses),
may come back decoded with ``+`` read as a space (``k3y with/slash=``, ``k3y%20with%2Fslash%3D``), with lower-case
hex escapes, JSON-escaped slashes or encoded twice; all of these are replaced. So is the key written character by
character in any mixture of the escapes a JSON or XML writer uses (``\u043a`` for a non-ASCII character, ``\"``
for a quote, numeric character references ``&#107;`` / ``&#x6b;``), and in a UTF-16 body (either byte order) as in
a UTF-8 one, the mask then written in the body's own encoding so the body still decodes.

Redacting the bytes received is not enough: a parser decodes what it reads (an XML parser turns ``&#107;`` into
``k``), and a spelling no pattern foresaw would reach the store decoded. So everything a parse returns (records,
search results: every string in them) is redacted again, after decoding (:meth:`Redactor.value`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

from clap.errors import ClapError

#: What a secret is replaced with.
MASK = "***"

_ESCAPE = re.compile(r"%[0-9A-F]{2}")
_factory_lock = threading.Lock()
#: XML's named character references
_NAMED = {'"': "&quot;", "&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;"}
#: The byte encodings a body may arrive in (a UTF-16 body is redacted as UTF-16, with a UTF-16 mask).
BODY_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")


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


def char_forms(char: str) -> set[str]:
    """One character as a JSON, XML or URL writer may spell it: itself, a numeric character reference (decimal, or
    hex in either case) or XML's named one, a JSON ``\\u`` escape (either case; a surrogate pair beyond the BMP), a
    backslash escape, its percent encoding (either case)."""
    code = ord(char)
    forms = {char, f"&#{code};", f"&#x{code:x};", f"&#x{code:X};", f"&#X{code:x};", f"&#X{code:X};"}
    units = [code] if code < 0x10000 else [0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)]
    forms |= {"".join(f"\\u{u:04x}" for u in units), "".join(f"\\u{u:04X}" for u in units)}
    if char in "\"\\/":
        forms.add("\\" + char)
    if char in _NAMED:
        forms.add(_NAMED[char])
    encoded = quote(char, safe="")
    forms |= {encoded, _ESCAPE.sub(lambda m: m.group(0).lower(), encoded)}  # mixed with the others, too
    return forms


def _alternation(options: Iterable[str], encoding: str) -> bytes:
    ordered = sorted(set(options), key=len, reverse=True)
    return b"(?:" + b"|".join(re.escape(o.encode(encoding, "surrogatepass")) for o in ordered) + b")"


def _pattern(secrets: list[str], encoding: str) -> re.Pattern[bytes] | None:
    """Every spelling of ``secrets`` in ``encoding``: the whole-key variants (:func:`variants`) and the key written
    character by character in any mixture of :func:`char_forms`."""
    parts = [_alternation({v for s in secrets for v in variants(s)}, encoding)] if secrets else []
    for base in sorted({b for s in secrets for b in (s, s.replace("+", " "))}):
        parts.append(b"".join(_alternation(char_forms(c), encoding) for c in base))
    return re.compile(b"|".join(parts)) if parts else None


class Redactor:
    """Replaces every spelling of the given secrets with :data:`MASK` in text, in raw bytes (UTF-8 or UTF-16) and in
    parsed values."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        keys = sorted({s for s in secrets if s})
        pattern = _pattern(keys, "utf-8")
        self._text = re.compile(pattern.pattern.decode("utf-8")) if pattern is not None else None
        self._bytes = [(p, MASK.encode(e)) for e in BODY_ENCODINGS if (p := _pattern(keys, e)) is not None]

    def __bool__(self) -> bool:
        return self._text is not None

    def __call__(self, text: str) -> str:
        return self._text.sub(MASK, text) if self._text is not None else text

    def redact_bytes(self, data: bytes) -> bytes:
        """Raw bytes of a body in any of :data:`BODY_ENCODINGS`: each spelling replaced by the mask in its own
        encoding (a UTF-16 body stays UTF-16)."""
        for pattern, mask in self._bytes:
            data = pattern.sub(mask, data)
        return data

    def value(self, value: Any) -> Any:
        """``value`` with every string in it redacted (after a parser decoded escapes the bytes still had): strings,
        lists, tuples, dicts and dataclass instances (fields set in place, frozen ones too)."""
        if not self:
            return value
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, tuple):
            return type(value)(self.value(v) for v in value) if not hasattr(value, "_fields") else \
                type(value)(*(self.value(v) for v in value))
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for item in dataclasses.fields(value):
                current = getattr(value, item.name)
                cleaned = self.value(current)
                if cleaned is not current:
                    object.__setattr__(value, item.name, cleaned)
            return value
        return value

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
