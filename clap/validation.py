"""One formatter for pydantic validation errors: ``file:line: field.path: what was expected``.

Why shared: study specs, probe files and fine-tuning configs are all pydantic schemas read from YAML; the user should
see the same kind of message (the file and line, the dotted field, the nearest valid names for a typo) whichever file
was wrong, and a fix to the formatting should reach all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from clap.errors import closest
from clap.yamlio import line_of


class StrictModel(BaseModel):
    """A schema that refuses unknown fields: a misspelt key is an error with a 'did you mean', never ignored."""

    model_config = ConfigDict(extra="forbid")

#: pydantic's names for union members in an error location (``'int'``, ``'str'``, ...): not data keys.
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict"}


def fields_at(model: type[BaseModel], location: tuple) -> list[str]:
    """Valid field names of the (nested) model at ``location``, for typo hints."""
    current: Any = model
    for part in location:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    return list(getattr(current, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _data_location(loc: tuple) -> tuple:
    """The error location without pydantic's union-member parts (e.g. 'str', 'int', 'MatchPosition')."""
    return tuple(p for p in loc if isinstance(p, int) or not (p[:1].isupper() or "[" in p or p in _TYPE_TAGS))


def _input_at(exc: ValidationError, location: tuple) -> Any:
    """The offending input value at ``location`` (pydantic reports it per union member; take the widest)."""
    for error in exc.errors():
        if _data_location(error["loc"]) == location:
            return error.get("input")
    for error in exc.errors():
        if tuple(error["loc"][: len(location)]) == location:
            return error.get("input")
    return None


def format_validation_error(exc: ValidationError, source: str, lines: dict, model: type[BaseModel], *,
                            title: str = "invalid settings", unions: Mapping[str, str] | None = None,
                            where: Mapping[str, str] | None = None) -> str:
    """``title:`` then one indented line per problem (see :func:`validation_messages`)."""
    messages = validation_messages(exc, source, lines, model, unions=unions, where=where)
    return f"{title}:\n  " + "\n  ".join(messages)


def validation_messages(exc: ValidationError, source: str, lines: dict, model: type[BaseModel], *,
                        unions: Mapping[str, str] | None = None, where: Mapping[str, str] | None = None,
                        show_input: bool = False, list_valid: bool = True) -> list[str]:
    """One line per problem: ``file:line: field.path: what was expected`` (+ nearest names for unknown keys).

    ``unions`` maps a list field whose items are a union of forms (e.g. ``positions``) to a help text: a bad item
    then gives one message with that text instead of one per alternative. ``where`` names top-level fields that came
    from elsewhere than the file (e.g. ``{"lr_scheduler": "--set lr_scheduler"}`` for command-line values); the
    label replaces ``file:line: field``. ``show_input`` adds the offending value to every message; ``list_valid``
    lists all valid field names after an unknown one (useful for small nested models, noise for large flat ones).
    """
    unions = unions or {}
    where = where or {}
    messages = []
    seen = set()
    for error in exc.errors():
        location = _data_location(error["loc"])
        field = ".".join(str(p) for p in location) or "(top level)"
        union = next((name for name in unions if name in location), None)
        index = location.index(union) + 2 if union else 0
        nested_value_error = len(location) > index and error["type"] not in ("extra_forbidden", "missing")
        in_union = bool(index) and not nested_value_error
        key = (location[:index], union) if in_union else (field, error["type"])
        if key in seen:
            continue
        seen.add(key)
        if in_union:  # one message for the whole union instead of one per alternative
            messages.append(f"{_where(source, lines, location[:index], where)}: "
                            f"{'.'.join(str(p) for p in location[:index])}: {unions[union]}, got "
                            f"{_input_at(exc, location[:index])!r}")
            continue
        if error["type"] == "extra_forbidden":
            valid = fields_at(model, location[:-1])
            hint = closest(str(location[-1]), valid)
            text = f"unknown field {location[-1]!r}" + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
            if valid and list_valid:
                text += f" (valid fields here: {', '.join(valid)})"
        elif error["type"] == "missing":
            text = "required field is missing"
        else:
            text = error["msg"].removeprefix("Value error, ")
            if error["type"] == "literal_error" or (show_input and "input" in error and error["type"] != "value_error"):
                text = f"{text}, got {error.get('input')!r}"
        if len(location) == 1 and location[0] in where:
            messages.append(f"{where[location[0]]}: {text}")
        else:
            messages.append(f"{_where(source, lines, location, where)}: {field}: {text}")
    return messages


def _where(source: str, lines: dict, location: tuple, where: Mapping[str, str]) -> str:
    if location and location[0] in where:
        return where[location[0]]
    line = line_of(lines, location)
    return f"{source}:{line}" if line else source
