"""Probe sets: load clean/corrupted prompt pairs, tokenise them, resolve answers and token positions.

Positions are always indices into the *unpadded* target prompt (the prompt that receives the patch: corrupted for
denoising, clean for noising). Batching later converts them to padded columns, so a position means the same token
whatever else shares the batch.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clap.contract import BEFORE_SUBJECT
from clap.errors import ClapError
from clap.yamlio import SourceError, load_jsonl, load_yaml
from interventions.alignment import shift_to
from interventions.spec import (
    FieldPosition,
    IndexPositions,
    MatchPosition,
    PositionSelector,
    ProbeSetSpec,
    ProbeSpec,
    StudySpec,
    format_validation_error,
)

log = logging.getLogger(__name__)


class ProbeError(ClapError):
    pass


@dataclass
class Probe:
    """A validated, tokenised probe."""

    id: str
    clean: str
    corrupted: str
    clean_ids: list[int]
    corrupted_ids: list[int]
    answer_ids: list[int]
    wrong_ids: list[int]
    labels: dict[str, str] = field(default_factory=dict)
    origin: str = ""  #: file:line or "inline[i]" for error messages

    def prompt_ids(self, which: str) -> list[int]:
        return self.clean_ids if which == "clean" else self.corrupted_ids


@dataclass(frozen=True)
class PositionCell:
    """One position selection for one probe: which target-prompt tokens a patch covers."""

    #: the selector: ``last``, ``each`` (one cell per token), ``3``, ``all``, ``indices:2,3``, ``match:Paris`` /
    #: ``match:Paris#1@corrupted`` (see ``match_label``)
    label: str
    position: int | None  #: the single token index, or None when several (or none) are patched together
    indices: tuple[int, ...]  #: target-prompt token indices


def read_probe_specs(probe_set: ProbeSetSpec, base_dir: Path) -> list[tuple[str, ProbeSpec]]:
    """(origin, ProbeSpec) pairs from the inline list or the probe file (JSONL, or YAML list / {probes: [...]}); a
    file that cannot be read or parsed is a :class:`ProbeError` naming it (and its line)."""
    if probe_set.inline is not None:
        return [(f"probes.inline[{i}]", p) for i, p in enumerate(probe_set.inline)]
    try:
        return _read_probe_file(probe_set, base_dir)
    except SourceError as exc:
        raise ProbeError(str(exc)) from None


def _read_probe_file(probe_set: ProbeSetSpec, base_dir: Path) -> list[tuple[str, ProbeSpec]]:
    path = Path(probe_set.file)
    if not path.is_absolute():
        path = base_dir / path
    out = []
    if path.suffix in (".yaml", ".yml"):
        data, lines = load_yaml(path)
        items = data.get("probes") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ProbeError(f"{path}: expected a list of probes (or a mapping with a `probes:` list)")
        prefix = ("probes",) if isinstance(data, dict) else ()
        for index, item in enumerate(items):
            origin_line = lines.get(prefix + (index,))
            out.append((f"{path}:{origin_line}", _validate_probe(item, f"{path}", lines, prefix + (index,))))
    elif path.suffix in (".jsonl", ".json"):
        for number, item in load_jsonl(path):
            out.append((f"{path}:{number}", _validate_probe(item, f"{path}:{number}", {}, ())))
    else:
        raise ProbeError(f"{path}: unknown probe file type {path.suffix!r}; use .jsonl or .yaml")
    if not out:
        raise ProbeError(f"{path}: the probe file holds no probes")
    return out


def _validate_probe(item: Any, source: str, lines: dict, prefix: tuple) -> ProbeSpec:
    if isinstance(item, dict):
        item = dict(item)
        # labels may be given as top-level keys of a probe record (e.g. "knowledge_type": "definitional")
        # ... unless the key looks like a misspelt field ('corupted'): then it stays and is reported as unknown
        known = set(ProbeSpec.model_fields)
        extra = {
            k: item.pop(k)
            for k in list(item)
            if k not in known
            and isinstance(item[k], (str, int, float))
            and not difflib.get_close_matches(k, known, n=1, cutoff=0.8)
        }
        if extra:
            item["labels"] = {**{k: str(v) for k, v in extra.items()}, **item.get("labels", {})}
        # list-valued provenance (e.g. "pmids": [123, 456]) documents a probe but does not label it: set aside
        for k in [k for k in item if k not in known and isinstance(item[k], list)]:
            if all(isinstance(v, (str, int, float)) for v in item[k]) and not difflib.get_close_matches(
                k, known, n=1, cutoff=0.8
            ):
                item.pop(k)
    try:
        return ProbeSpec.model_validate(item)
    except ValidationError as exc:
        shifted = {k[len(prefix):]: v for k, v in lines.items() if k[: len(prefix)] == prefix}
        message = format_validation_error(exc, source, shifted, ProbeSpec).replace("study spec", "probe")
        raise ProbeError(message) from None


def _answer_ids(value: Any, tokenizer: Any, policy: str, origin: str, what: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    ids: list[int] = []
    vocab_size = len(tokenizer)
    for item in values:
        if isinstance(item, int):
            if not 0 <= item < vocab_size:
                raise ProbeError(f"{origin}: {what} token id {item} is outside the vocabulary (0..{vocab_size - 1})")
            ids.append(item)
            continue
        pieces = tokenizer(item, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ProbeError(f"{origin}: {what} {item!r} tokenises to nothing")
        if len(pieces) > 1:
            shown = [tokenizer.decode([t]) for t in pieces]
            if policy == "error":
                raise ProbeError(
                    f"{origin}: {what} {item!r} is {len(pieces)} tokens {shown}; give a single token (mind the "
                    f"leading space), a token id, or set probes.multi_token to 'first' or 'set'"
                )
            pieces = pieces[:1] if policy == "first" else pieces
        ids.extend(pieces)
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class ProbeRules:
    """What a study asks of each probe, read from its spec in one place: ``spec_probes`` refuses what breaks these
    rules before a run, and ``clap probes check --study`` reports the same rules per probe, so a probe the check
    calls valid is one the study runs.

    ``corrupted_prompt: clean`` (causal tracing, an ablation of the clean run, cross-model patching on one prompt)
    runs the clean prompt as the corrupted run: no corrupted prompt is needed, and nothing has to flip. ``subject`` is
    a trace's subject field (the model must know the fact by p(answer)); ``needs_wrong``: a ``logit_diff`` metric."""

    multi_token: str = "error"
    alignment: str = "strict"
    corrupted_prompt: str = "probe"
    subject: str | None = None
    needs_wrong: bool = True

    @classmethod
    def of(cls, spec: StudySpec) -> ProbeRules:
        return cls(multi_token=spec.probes.multi_token, alignment=spec.alignment,
                   corrupted_prompt=spec.corrupted_prompt,
                   subject=spec.trace.subject if spec.trace is not None else None,
                   needs_wrong="logit_diff" in spec.metrics)

    @property
    def trace(self) -> bool:
        return self.subject is not None

    @property
    def flips_needed(self) -> bool:
        """The corrupted prompt must turn the model away from the answer: only a study that runs the probe's own
        corrupted prompt has one to turn it."""
        return self.corrupted_prompt == "probe"


def tokenize_probes(
    specs: Sequence[tuple[str, ProbeSpec]], tokenizer: Any, multi_token: str = "error",
    corrupted_prompt: str = "probe", subject: str | None = None, problems: list[str] | None = None,
    warn: bool = True,
) -> list[Probe]:
    """Tokenise prompts (no special tokens added beyond what the tokenizer adds itself) and answers.

    Every probe is checked before anything is refused, so one run names every problem of the file: with
    ``problems`` given, each is appended there (and the probes that could be tokenised are returned) for the caller
    to add its own checks and raise once (:func:`raise_problems`); without it they are raised here, all together.

    ``corrupted_prompt="clean"`` (causal tracing) runs the clean prompt as the corrupted run: a probe may then leave
    out ``corrupted``, and one that gives a different prompt is warned about (a trace ignores it). ``subject`` names
    the field a trace noises: every probe must carry it, as a substring of its clean prompt."""
    own = [] if problems is None else problems
    probes: list[Probe] = []
    seen: dict[str, str] = {}
    ignored: list[str] = []
    for index, (origin, spec) in enumerate(specs):
        probe_id = spec.id or f"p{index:04d}"
        if probe_id in seen:
            own.append(f"{origin}: duplicate probe id {probe_id!r} (first at {seen[probe_id]})")
            continue
        seen[probe_id] = origin
        corrupted = spec.corrupted
        if corrupted_prompt == "clean":
            if corrupted is not None and corrupted != spec.clean:
                ignored.append(probe_id)
            corrupted = spec.clean
        elif corrupted is None:
            own.append(f"{origin}: probe {probe_id} has no `corrupted` prompt; only a causal trace (`trace:`) runs "
                       f"without one")
            continue
        if subject is not None:
            problem = subject_problem(spec, subject)
            if problem:
                own.append(f"{origin}: probe {probe_id} {problem}")
        try:
            answer = _answer_ids(spec.answer, tokenizer, multi_token, origin, "answer")
            wrong = _answer_ids(spec.wrong, tokenizer, multi_token, origin, "wrong") if spec.wrong is not None else []
        except ProbeError as exc:
            own.append(str(exc))
            continue
        probes.append(
            Probe(
                id=probe_id,
                clean=spec.clean,
                corrupted=corrupted,
                clean_ids=list(tokenizer(spec.clean)["input_ids"]),
                corrupted_ids=list(tokenizer(corrupted)["input_ids"]),
                answer_ids=answer,
                wrong_ids=wrong,
                labels=dict(spec.labels),
                origin=origin,
            )
        )
    if ignored and warn and subject is not None:  # a trace; other clean-prompt designs say so themselves
        log.warning("%d probe(s) carry a `corrupted` prompt other than their clean one (%s): a causal trace ignores "
                    "it (its corrupted run is the clean prompt with noise on the subject's tokens)",
                    len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if not specs:
        own.append("the probe set is empty")
    own.extend(label_key_problems([(origin, spec.id or f"p{i:04d}", spec.labels)
                                   for i, (origin, spec) in enumerate(specs)], skip=subject))
    if problems is None:
        raise_problems(own)
    return probes


def subject_problem(spec: ProbeSpec, subject: str) -> str:
    """Why a trace cannot noise this probe's subject ("" when it can)."""
    if subject not in spec.labels:
        return (f"has no `{subject}` field: a causal trace noises the tokens of the string it names "
                f"(trace.subject: {subject})")
    value = spec.labels[subject]
    if value not in spec.clean:
        hint = ""
        if value.strip() and value.strip() in spec.clean:
            hint = " (mind the leading or trailing space)"
        return f"has {subject} {value!r}, which is not in its clean prompt {spec.clean!r}{hint}"
    return ""


def label_key_problems(labelled: Sequence[tuple[str, str, dict[str, str]]], skip: str | None = None) -> list[str]:
    """Every probe needs the same label fields (they become result columns): ``origin: probe ID ...`` for each
    probe whose fields differ (:func:`label_field_differences`)."""
    differences = label_field_differences([labels for _, _, labels in labelled], skip)
    return [f"{origin}: probe {probe_id} {difference}"
            for (origin, probe_id, _), difference in zip(labelled, differences, strict=True) if difference]


def label_field_differences(labels: Sequence[dict[str, str]], skip: str | None = None) -> list[str]:
    """Per probe, "" or how its label fields differ from the most common set of fields (it lacks a field the others
    carry, or carries one they lack). ``skip`` (a trace's subject field) is reported on its own."""
    keys = [frozenset(k for k in mine if k != skip) for mine in labels]
    if len(set(keys)) <= 1:
        return [""] * len(keys)
    common = max(set(keys), key=lambda k: (keys.count(k), sorted(k)))
    n_common = keys.count(common)
    out = []
    for mine in keys:
        parts = []
        if common - mine:
            parts.append(f"lacks field(s) {', '.join(f'`{k}`' for k in sorted(common - mine))}")
        if mine - common:
            parts.append(f"carries field(s) {', '.join(f'`{k}`' for k in sorted(mine - common))}")
        out.append(f"{' and '.join(parts)}, unlike the {n_common} probe(s) with fields "
                   f"{', '.join(f'`{k}`' for k in sorted(common)) or 'none'}; every probe needs the same label fields"
                   if parts else "")
    return out


#: the most problems one error lists (the count of the rest follows)
MAX_LISTED = 50


def raise_problems(problems: Sequence[str], probe_file: str | None = None, model: str | None = None,
                   study: str | None = None) -> None:
    """One ProbeError naming every problem found (up to :data:`MAX_LISTED`), pointing to ``clap probes check``:
    ``--study SPEC`` when the probes came from a study file (the check then applies that study's own rules and
    model), else the probe file and model."""
    if not problems:
        return
    shown = list(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    command = (f"clap probes check --study {study}" if study else
               f"clap probes check {probe_file or 'PROBES.jsonl'} --model {model or 'MODEL'}")
    raise ProbeError(
        f"{len(problems)} probe problem(s):\n  " + "\n  ".join(shown) + more
        + f"\nfor a per-probe table of tokens, answers and logit differences run `{command}` "
          f"(`--write-valid FILE` keeps the probes a study can run)"
    )


def check_alignment(probes: Sequence[Probe], alignment: str, problems: list[str] | None = None) -> None:
    """Position-wise patching needs clean and corrupted prompts of one token length, unless aligned at the end.
    With ``problems`` given, each mismatch is appended there instead of raised."""
    if alignment != "strict":
        return
    bad = [p for p in probes if len(p.clean_ids) != len(p.corrupted_ids)]
    if not bad:
        return
    lines = [f"probe {p.id} ({p.origin}): clean {len(p.clean_ids)} tokens, corrupted {len(p.corrupted_ids)}: "
             f"positions cannot be matched (make the pair the same length, or set `alignment: right`)" for p in bad]
    if problems is not None:
        problems.extend(lines)
        return
    raise ProbeError(
        "clean and corrupted prompts differ in token length, so positions cannot be matched:\n  "
        + "\n  ".join(lines[:5])
        + ("\n  ..." if len(bad) > 5 else "")
        + "\nmake the pairs the same length, or set `alignment: right` to match positions from the end"
    )


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode exactly as tokenised: no clean-up of spaces before punctuation, which would shift characters."""
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


#: config attributes that hold a model's context length (the number of positions it has embeddings or was trained for)
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_length(config: Any) -> tuple[int, str] | None:
    """(context length, the config attribute it came from), or None when the config names none."""
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def too_long_problem(which: str, n_tokens: int, context: tuple[int, str]) -> str:
    """The sentence for a prompt past the model's context (``context``: :func:`context_length`'s answer)."""
    return (f"its {which} prompt is {n_tokens} tokens, longer than the model's context of {context[0]} tokens "
            f"({context[1]}); shorten it")


def check_context(probes: Sequence[Probe], config: Any, problems: list[str] | None = None) -> None:
    """Refuse prompts longer than the model's context before any forward pass: past it, learned position
    embeddings index out of range (a deep torch error) and rotary models run on positions they never saw. With
    ``problems`` given, each too-long prompt is appended there instead of raised."""
    found = context_length(config)
    if found is None:
        return
    limit, name = found
    too_long = [(p, which, len(p.prompt_ids(which))) for p in probes for which in ("clean", "corrupted")
                if len(p.prompt_ids(which)) > limit]
    if problems is not None:
        problems.extend(f"probe {p.id} ({p.origin}): {too_long_problem(which, n, found)}" for p, which, n in too_long)
        return
    if too_long:
        probe, which, n = too_long[0]
        more = f" (and {len(too_long) - 1} more prompts)" if len(too_long) > 1 else ""
        raise ProbeError(
            f"probe {probe.id} ({probe.origin}): its {which} prompt is {n} tokens, longer than the model's context "
            f"of {limit} tokens ({name}){more}; shorten it"
        )


def token_spans(ids: Sequence[int], tokenizer: Any) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each token in ``_decode(ids)``: the characters its bytes belong to.

    One character may span several tokens (a CJK character or an emoji as two to four byte-level BPE tokens, or as
    SentencePiece byte-fallback tokens ``<0xE7>``...), and every one of them covers that character. Decoding
    prefixes works for any tokenizer: the prefix through token ``i`` agrees with the full text on its first ``k``
    characters; if it then goes on (a partly decoded character, shown as U+FFFD), token ``i`` also covers
    character ``k``, and the next token starts there.
    """
    full = _decode(tokenizer, ids)
    spans = []
    start = 0
    for i in range(len(ids)):
        prefix = _decode(tokenizer, ids[: i + 1])
        agreed = len(os.path.commonprefix([prefix, full]))
        agreed = max(agreed, start)
        end = agreed + 1 if len(prefix) > agreed and agreed < len(full) else agreed
        spans.append((start, max(end, start)))
        start = agreed
    return spans


def resolve_positions(
    selector: PositionSelector, probe: Probe, target: str, source: str, tokenizer: Any
) -> list[PositionCell]:
    """Position cells of one selector for one probe, as indices into the target prompt."""
    n_target = len(probe.prompt_ids(target))
    if selector == "all":
        return [PositionCell("all", None, tuple(range(n_target)))]
    if selector == "none":
        return [PositionCell("none", None, ())]
    if selector == "last":
        return [PositionCell("last", n_target - 1, (n_target - 1,))]
    if selector == "each":
        # one cell per token, all labelled "each" so a sweep stays one slice (layer x position heatmaps)
        return [PositionCell("each", i, (i,)) for i in range(n_target)]
    if isinstance(selector, int):
        if not -n_target <= selector < n_target:
            raise ProbeError(f"probe {probe.id} ({probe.origin}): position {selector} is outside its {n_target} tokens")
        index = selector % n_target
        return [PositionCell(str(selector), index, (index,))]
    if isinstance(selector, IndexPositions):
        for i in selector.indices:
            if not -n_target <= i < n_target:
                raise ProbeError(f"probe {probe.id} ({probe.origin}): position {i} is outside its {n_target} tokens")
        indices = tuple(sorted({i % n_target for i in selector.indices}))
        label = "indices:" + ",".join(str(i) for i in selector.indices)
        return [PositionCell(label, indices[0] if len(indices) == 1 else None, indices)]
    if isinstance(selector, MatchPosition):
        return [_match_cell(selector, probe, target, tokenizer)]
    if isinstance(selector, FieldPosition):
        return [field_cell(selector, probe, target, tokenizer)]
    raise ProbeError(f"unknown position selector {selector!r}")


def _match_cell(selector: MatchPosition, probe: Probe, target: str, tokenizer: Any) -> PositionCell:
    prompt = probe.clean if selector.prompt == "clean" else probe.corrupted
    ids = probe.prompt_ids(selector.prompt)
    text = _decode(tokenizer, ids)
    starts = []
    start = text.find(selector.match)
    while start >= 0:
        starts.append(start)
        start = text.find(selector.match, start + 1)
    if not starts:
        raise ProbeError(
            f"probe {probe.id} ({probe.origin}): substring {selector.match!r} not found in its {selector.prompt} "
            f"prompt {prompt!r}"
        )
    try:
        begin = starts[selector.occurrence]
    except IndexError:
        raise ProbeError(
            f"probe {probe.id} ({probe.origin}): occurrence {selector.occurrence} of {selector.match!r} requested, "
            f"found {len(starts)}"
        ) from None
    end = begin + len(selector.match)
    spans = token_spans(ids, tokenizer)
    indices = [i for i, (a, b) in enumerate(spans) if a < end and b > begin]
    # the named prompt may differ in length from the target (right alignment): shift to target coordinates
    indices = shift_to(indices, len(ids), len(probe.prompt_ids(target)))
    return PositionCell(match_label(selector), indices[0] if len(indices) == 1 else None, indices)


def field_value(probe: Probe, name: str) -> str:
    """A probe's own field (``subject``, or any other label it carries) by name, or an error naming those it has."""
    if name in ("clean", "corrupted"):
        return getattr(probe, name)
    if name not in probe.labels:
        raise ProbeError(f"probe {probe.id} ({probe.origin}): no field {name!r} for a {{field: {name}}} position; "
                         f"its fields: {', '.join(sorted(probe.labels)) or 'none besides the prompts'}")
    return probe.labels[name]


def subject_range(probe: Probe, name: str, prompt: str, target: str, tokenizer: Any) -> tuple[int, int]:
    """[first, last] target-prompt token indices of the field's string (its first occurrence)."""
    cell = _match_cell(MatchPosition(match=field_value(probe, name), prompt=prompt), probe, target, tokenizer)
    if not cell.indices:
        raise ProbeError(f"probe {probe.id} ({probe.origin}): its {name} has no token in the target prompt")
    return cell.indices[0], cell.indices[-1]


def token_groups(index: int, first: int, last: int, n_tokens: int) -> tuple[str, ...]:
    """Every ROME token group of a target-prompt token, given the subject's [first, last] token indices, as ROME's
    averages (``average_causal_effects``: ``scores[first_e]``, ``scores[first_e + 1:last_e]``, ``scores[last_e]``,
    ``scores[first_a]``, ``scores[first_a + 1:last_a]``, ``scores[last_a]``) count it: a one-token subject's token
    is its first and its last subject token; the token right after the subject is the first subsequent one even
    when it is the prompt's last; tokens before the subject are in no group (empty tuple)."""
    groups = []
    if index == first:
        groups.append("first subject")
    if first < index < last:
        groups.append("middle subject")
    if index == last:
        groups.append("last subject")
    if index == last + 1:
        groups.append("first subsequent")
    if last + 1 < index < n_tokens - 1:
        groups.append("further")
    if index == n_tokens - 1:
        groups.append("last")
    return tuple(groups)


def token_group(index: int, first: int, last: int, n_tokens: int) -> str:
    """The one label a results row carries (``token_group``): the token's first ROME group in the order ``last``,
    then prompt order (so a one-token subject's token reads ``first subject``, and the prompt's last token ``last``
    even when it directly follows the subject); :data:`BEFORE_SUBJECT` for a token before the subject.
    ``analyses.trace.token_group_table`` counts a token in each of its groups (:func:`token_groups`)."""
    if index == n_tokens - 1:
        return "last"
    groups = token_groups(index, first, last, n_tokens)
    return groups[0] if groups else BEFORE_SUBJECT


def field_cell(selector: FieldPosition, probe: Probe, target: str, tokenizer: Any) -> PositionCell:
    """The tokens of a probe field's string, or one of ROME's groups relative to it."""
    first, last = subject_range(probe, selector.field, selector.prompt, target, tokenizer)
    n = len(probe.prompt_ids(target))
    chosen = {
        "all": range(first, last + 1),
        "first": [first],
        "last": [last],
        "middle": range(first + 1, last),
        "after": [last + 1] if last + 1 < n else [],
        "further": range(last + 2, n - 1),
    }[selector.token]
    indices = tuple(chosen)
    label = f"field:{selector.field}" + ("" if selector.token == "all" else f"@{selector.token}")
    return PositionCell(label, indices[0] if len(indices) == 1 else None, indices)


def match_label(selector: MatchPosition) -> str:
    """The ``positions`` label of a match selector: canonical (equal selectors, equal labels) and unambiguous
    (different selectors, different labels), so each selection is its own slice of the results.

    ``match:TEXT``, then ``#N`` when ``occurrence`` is not 0 and ``@corrupted`` when the substring is looked up in
    the corrupted prompt: ``match:Paris``, ``match:Paris#1``, ``match:Paris#-1@corrupted``. TEXT is written as a
    JSON string (``match:"a#1"``) when it holds ``#``, ``@`` or ``"`` or starts with a quote, so it cannot be
    confused with the suffixes.
    """
    text = selector.match
    if any(c in text for c in '#@"'):
        text = json.dumps(text, ensure_ascii=False)
    occurrence = f"#{selector.occurrence}" if selector.occurrence != 0 else ""
    prompt = f"@{selector.prompt}" if selector.prompt != "clean" else ""
    return f"match:{text}{occurrence}{prompt}"


def load_probes(probe_set: ProbeSetSpec, tokenizer: Any, base_dir: Path, corrupted_prompt: str = "probe",
                subject: str | None = None, problems: list[str] | None = None, warn: bool = True) -> list[Probe]:
    """The probe set read and tokenised (see :func:`tokenize_probes` for ``corrupted_prompt``, ``subject`` and
    ``problems``)."""
    return tokenize_probes(read_probe_specs(probe_set, base_dir), tokenizer, probe_set.multi_token,
                           corrupted_prompt=corrupted_prompt, subject=subject, problems=problems, warn=warn)
