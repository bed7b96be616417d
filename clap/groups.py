"""Which probe label splits the probes into the groups of the between-group tests.

Probe files carry labels besides the prompts: the design's grouping (``knowledge_type``), but also provenance
(``pmids``, a ``bioasq_id``, a source URL) and per-probe fields (``subject``). Taking the first label in alphabetical
order once split a study by question id into one-probe groups, silently. So the group is declared, with one
spelling (``analysis: {group: NAME}`` in a spec or study file; ``--group NAME`` on the command line, which wins), or
else chosen by :func:`default_group`: ``knowledge_type`` when the probes carry it, otherwise the first label (in
alphabetical order) that can be a grouping at all. A label is never chosen by default when

* it is provenance (:func:`provenance_reason`): its name says id, PMID, DOI, URL, source, reference, citation
  (``bioasq_id``, ``pmids``, ``pmid_terms``, ``sourceUrl``), or its values are lists;
* it is the subject field (``analysis.subject_field``, default ``subject``): each probe's subject words;
* it has one value only, or a value of its own for every probe (no group could hold two probes).

A declared group is used as declared (it must be a label of the probes); the analyses then say in a caveat when a
group has fewer than 2 complete probes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from clap.errors import ClapError, closest

#: The default group when the probes carry it (the shipped probe sets do).
DEFAULT_GROUP = "knowledge_type"
#: Words of a label's name that mark it as provenance (where a probe came from), never a grouping.
PROVENANCE_WORDS = frozenset({
    "id", "ids", "uid", "uuid", "pmid", "pmids", "pmcid", "pmcids", "doi", "dois", "url", "urls", "uri", "uris",
    "source", "sources", "ref", "refs", "reference", "references", "citation", "citations", "accession",
    "accessions", "provenance", "link", "links", "hash",
})


def _words(name: str) -> list[str]:
    """``bioasq_id`` -> ``[bioasq, id]``; ``sourceURL`` -> ``[source, url]``; ``PMIDs`` -> ``[pmids]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def _is_list(value: Any) -> bool:
    if isinstance(value, (list, tuple, set, dict)):
        return True
    text = str(value).strip()
    return len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("{", "}"), ("(", ")"))


def provenance_reason(name: str, values: Iterable[Any] = ()) -> str | None:
    """Why label ``name`` is provenance (an id, PMIDs, a source, lists), or None when it is not."""
    hits = [w for w in _words(name) if w in PROVENANCE_WORDS]
    if hits:
        return f"its name says `{hits[0]}` (provenance, not a grouping)"
    if any(_is_list(v) for v in values):
        return "its values are lists (provenance, not a grouping)"
    return None


def unusable_reason(name: str, values: Sequence[Any], subject_field: str = "subject") -> str | None:
    """Why label ``name`` (``values``: one per probe) cannot be the default group, or None when it can."""
    reason = provenance_reason(name, values)
    if reason:
        return reason
    if name == subject_field:
        return "it is the subject field (each probe's subject words)"
    distinct = {str(v) for v in values}
    if len(distinct) < 2:
        return "it has a single value"
    if len(distinct) == len(values):
        return "every probe has a value of its own"
    return None


def default_group(labels: Mapping[str, Sequence[Any]], subject_field: str = "subject") -> str | None:
    """The group when none is declared: ``knowledge_type`` when present, else the first label (alphabetical) that
    :func:`unusable_reason` accepts, else None (no group tests). ``labels``: label -> its value per probe."""
    if DEFAULT_GROUP in labels:
        return DEFAULT_GROUP
    for name in sorted(labels):
        if unusable_reason(name, list(labels[name]), subject_field) is None:
            return name
    return None


def resolve_group(declared: str | None, labels: Mapping[str, Sequence[Any]], subject_field: str = "subject",
                  where: str = "analysis.group") -> str | None:
    """The declared group (checked: a label of the probes) or :func:`default_group`. An unknown name raises
    :class:`~clap.errors.ClapError` naming ``where``, the nearest labels and all of them."""
    if declared is None:
        return default_group(labels, subject_field)
    if declared not in labels:
        hint = closest(declared, list(labels))
        raise ClapError(f"{where}: {declared!r} is not a label of the probes"
                        + (f"; did you mean {hint[0]!r}?" if hint else "")
                        + f" (labels: {', '.join(sorted(labels)) or 'none besides the prompts'})")
    return declared


def ordered_labels(labels: Mapping[str, Sequence[Any]], declared: str | None = None,
                   subject_field: str = "subject", where: str = "analysis.group") -> list[str]:
    """The label columns as ``run.json`` lists them (``group_columns``): the group first (declared or default), so
    a reader that takes the first finds it, then the other labels in alphabetical order."""
    group = resolve_group(declared, labels, subject_field, where)
    return ([group] if group else []) + sorted(name for name in labels if name != group)


def choice_words(group: str | None, declared: bool, labels: Sequence[str], subject_field: str = "subject",
                 values: Mapping[str, Sequence[Any]] | None = None) -> str:
    """One sentence for the Methods: which label grouped the probes, why, and why the others did not."""
    others = [name for name in labels if name != group]
    if group is None:
        head = "Groups: none (no probe label can group the probes"
        head += f": {_why_not(others, subject_field, values)})." if others else ")."
        return head + " Declare one with `analysis: {group: NAME}` or `--group NAME`."
    how = ("declared (`analysis.group` or `--group`)" if declared else
           f"the default `{DEFAULT_GROUP}`" if group == DEFAULT_GROUP else
           "the first label that can group the probes (declare another with `analysis: {group: NAME}`)")
    text = f"Groups: `{group}`, {how}."
    if others:
        text += f" Labels not used as the group: {_why_not(others, subject_field, values)}."
    return text


def _why_not(names: Sequence[str], subject_field: str, values: Mapping[str, Sequence[Any]] | None) -> str:
    parts = []
    for name in names:
        reason = unusable_reason(name, list((values or {}).get(name, ())), subject_field) if values else \
            provenance_reason(name)
        parts.append(f"`{name}`" + (f" ({reason})" if reason else ""))
    return ", ".join(parts)
