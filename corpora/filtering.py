"""Which abstracts belong in the corpus: a named list of case-insensitive regular expressions over title + abstract.

The seed study reports its corpus as mentions per term ("20,595 mentions of epilepsy, 11,674 of EEG, 13,921 of
seizure") and records per term; :class:`TermFilter` gives both from one pass. The default terms are
word-bounded, so "EEG" does not match inside another word and "antiepileptic" is not also counted as "epileptic";
the hyphenated "anti-epileptic" does count for both (the hyphen is a word boundary), as a reader skimming for
"epileptic" would count it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corpora.errors import CorpusError, CorpusInputError

#: The seed study's topic, as name -> regex (matched case-insensitively on title + abstract).
DEFAULT_TERMS: dict[str, str] = {
    "epilepsy": r"\bepilep(?:sy|sies|tic|tics)\b",
    "seizure": r"\bseizures?\b",
    "EEG": r"\bEEGs?\b",
    "anticonvulsant": r"\banti-?convulsants?\b",
    "antiepileptic": r"\banti-?epileptics?\b",
}


def parse_term(spec: str) -> tuple[str, str]:
    """``NAME=REGEX`` or a bare ``REGEX`` (then named by itself)."""
    name, sep, pattern = spec.partition("=")
    if sep and name.strip() and re.fullmatch(r"[\w .+-]+", name.strip()):
        return name.strip(), pattern
    return spec, spec


def load_terms(specs: Iterable[str] = (), terms_file: str | Path | None = None) -> dict[str, str]:
    """Terms from command-line specs and/or a file (one spec a line, ``#`` comments); defaults when none given."""
    terms: dict[str, str] = {}
    if terms_file is not None:
        path = Path(terms_file)
        if not path.is_file():
            raise CorpusInputError(path, "terms file not found")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                name, pattern = parse_term(line)
                if not pattern:
                    raise CorpusInputError(path, f"empty pattern for term {name!r}", line=lineno)
                terms[name] = pattern
    for spec in specs:
        name, pattern = parse_term(spec)
        terms[name] = pattern
    return terms or dict(DEFAULT_TERMS)


@dataclass
class TermFilter:
    """Compiled terms; ``matches`` finds which terms a text mentions and how often."""

    terms: Mapping[str, str]
    _compiled: dict[str, re.Pattern] = field(init=False, repr=False)
    _any: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.terms:
            raise CorpusError("no filter terms given")
        self._compiled = {}
        for name, pattern in self.terms.items():
            try:
                self._compiled[name] = re.compile(pattern, re.IGNORECASE)
            except re.error as exc:
                raise CorpusError(f"term {name!r}: invalid regular expression {pattern!r} ({exc})") from exc
        # one combined scan rejects the (vast) majority of non-matching abstracts quickly
        self._any = re.compile("|".join(f"(?:{p})" for p in self.terms.values()), re.IGNORECASE)

    @property
    def names(self) -> list[str]:
        return list(self.terms)

    def matches(self, text: str) -> dict[str, int]:
        """Mentions per term in ``text`` (only terms mentioned at least once)."""
        if not self._any.search(text):
            return {}
        found = {}
        for name, regex in self._compiled.items():
            n = sum(1 for _ in regex.finditer(text))
            if n:
                found[name] = n
        return found
