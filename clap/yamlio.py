"""YAML and JSONL reading that remembers where each value came from, so errors can name file and line."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import yaml

from clap.errors import ClapError

Location = tuple  # path of keys/indices into the document


class SourceError(ClapError):
    pass


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark is dropped); a byte that is not UTF-8 is an error naming
    the file, its line and column and its byte offset, rather than a traceback from deep inside a parser."""
    data = Path(path).read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise SourceError(
            f"{path}:{line}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}, "
            f"column {column}); save the file as UTF-8"
        ) from None


def _walk(node: yaml.Node, path: Location, lines: dict[Location, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            lines[child] = key.start_mark.line + 1
            _walk(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            _walk(value, path + (index,), lines)


def load_yaml(path: Path) -> tuple[Any, dict[Location, int]]:
    """Parse a YAML file; return the data and a map from key paths to 1-based line numbers."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise SourceError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    lines: dict[Location, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_of(lines: dict[Location, int], location: Location) -> int | None:
    """The line of the deepest known prefix of ``location``."""
    location = tuple(location)
    while location not in lines and location:
        location = location[:-1]
    return lines.get(location)


def load_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found")
    records = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise SourceError(f"{path}:{number}: expected a JSON object per line, got {type(obj).__name__}")
        records.append((number, obj))
    return records
