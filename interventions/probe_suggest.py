"""Why a clean/corrupted pair differs in token length, and same-length substitutes for its corrupted words.

Used by ``clap probes check``: a length mismatch is only fixable once the user sees the tokens (a word is often split
where they did not expect, and ``' Paris'`` after a space is a different token from ``'Paris'``), and a substitute
that keeps the pair's length is what a study under ``alignment: strict`` needs. Suggestions are candidates, never
changes: the user decides whether a word keeps the probe's meaning.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: how many substitutes a mismatch lists
MAX_SUGGESTIONS = 6
#: the vocabulary tokens compared with a differing word (the nearest by spelling)
VOCABULARY_CANDIDATES = 60
_WORD = re.compile(r"[^\W\d_][\w'-]*")


def pieces(tokenizer: Any, text: str) -> list[str]:
    """The prompt's tokens as strings, each with its leading space (what the model sees)."""
    return [tokenizer.decode([i]) for i in tokenizer(text)["input_ids"]]


def differing_span(clean: str, corrupted: str) -> tuple[int, int, int]:
    """(start, end in ``corrupted``, end in ``clean``): the characters where the prompts differ, widened to whole
    words (a shared prefix or suffix stops at a word boundary, so the span is words, not fragments)."""
    start = 0
    limit = min(len(clean), len(corrupted))
    while start < limit and clean[start] == corrupted[start]:
        start += 1
    while start > 0 and not corrupted[start - 1].isspace():
        start -= 1
    tail = 0
    while tail < limit - start and clean[len(clean) - 1 - tail] == corrupted[len(corrupted) - 1 - tail]:
        tail += 1
    while tail > 0 and corrupted[len(corrupted) - tail].isalnum() and corrupted[len(corrupted) - tail - 1].isalnum():
        tail -= 1
    return start, len(corrupted) - tail, len(clean) - tail


def mismatch_message(tokenizer: Any, clean: str, corrupted: str, subject: str | None = None,
                     suggesting: bool = False) -> str:
    """``clean is 11 tokens, corrupted 10`` with both prompts' tokens, the differing words' tokens, the subject's
    tokens when the probe names one, and the leading-space rule."""
    clean_pieces, corrupted_pieces = pieces(tokenizer, clean), pieces(tokenizer, corrupted)
    start, end, clean_end = differing_span(clean, corrupted)
    parts = [f"clean is {len(clean_pieces)} tokens {clean_pieces}, corrupted {len(corrupted_pieces)} "
             f"{corrupted_pieces}"]
    if clean[start:clean_end] or corrupted[start:end]:
        parts.append(f"they differ in {clean[start:clean_end]!r} {_in_context(tokenizer, clean, start, clean_end)} "
                     f"vs {corrupted[start:end]!r} {_in_context(tokenizer, corrupted, start, end)}")
    if subject and subject in clean:
        at = clean.index(subject)
        parts.append(f"subject {subject!r} is {_in_context(tokenizer, clean, at, at + len(subject))} in the clean "
                     f"prompt")
    parts.append("a word after a space is its own token (' Paris' is not 'Paris'), so keep the spaces as the study "
                 "will use them" + ("" if suggesting else "; --suggest lists same-length substitutes"))
    return "; ".join(parts)


def _in_context(tokenizer: Any, text: str, start: int, end: int) -> list[str]:
    """The tokens of ``text`` that overlap characters [start, end), as the whole prompt tokenises them."""
    ids = tokenizer(text, return_offsets_mapping=True) if _has_offsets(tokenizer) else None
    if ids is not None:
        return [tokenizer.decode([i]) for i, (a, b) in zip(ids["input_ids"], ids["offset_mapping"], strict=True)
                if a < end and b > start and b > a]
    return pieces(tokenizer, text[start:end])  # slow tokenizers: the words on their own


def _has_offsets(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def suggest_substitutes(tokenizer: Any, clean: str, corrupted: str, words: Iterable[str] = (),
                        limit: int = MAX_SUGGESTIONS) -> list[str]:
    """Corrupted prompts in which the differing words are replaced so that the prompt has the clean prompt's token
    count, nearest spelling first. Candidates: the words' other capitalisations, ``words`` (e.g. every word and
    subject of the probe file: same-domain terms), then the vocabulary's whole-word tokens nearest in spelling."""
    target = len(tokenizer(clean)["input_ids"])
    start, end, _ = differing_span(clean, corrupted)
    span = corrupted[start:end]
    if not span.strip():
        return []
    prefix, suffix = corrupted[:start], corrupted[end:]
    seen: set[str] = set()
    found: list[str] = []
    for candidate in _candidates(tokenizer, span, words):
        if candidate in seen or candidate == span:
            continue
        seen.add(candidate)
        prompt = prefix + candidate + suffix
        if prompt != clean and len(tokenizer(prompt)["input_ids"]) == target:
            found.append(prompt)
            if len(found) >= limit:
                break
    return found


def _candidates(tokenizer: Any, span: str, words: Iterable[str]) -> Iterable[str]:
    yield from (span.lower(), span.capitalize(), span.upper())
    capital = span[:1].isupper()
    pool = sorted({w for w in words if w[:1].isupper() == capital}, key=lambda w: -_similarity(span, w))
    yield from pool
    vocabulary = _whole_words(tokenizer, capital)
    yield from difflib.get_close_matches(span, vocabulary, n=VOCABULARY_CANDIDATES, cutoff=0.0)


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def _whole_words(tokenizer: Any, capital: bool) -> list[str]:
    """Vocabulary tokens that are a word of 3+ letters (decoded, leading space removed), in the span's case."""
    out = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id]).strip()
        if len(text) >= 3 and text.isalpha() and text[:1].isupper() == capital:
            out.add(text)
    return sorted(out)


def file_words(texts: Sequence[str]) -> list[str]:
    """Every word (and multi-word subject given whole) of the probe file's prompts and subjects."""
    out: dict[str, None] = {}
    for text in texts:
        if " " in text.strip() and len(text.split()) <= 3:
            out.setdefault(text.strip())
        for word in _WORD.findall(text):
            out.setdefault(word)
    return list(out)
