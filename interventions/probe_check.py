"""``clap probes check``: is a probe file fit for patching on a given model, before any patching is run?

Why a separate check: a patching study only means something on probes whose clean and corrupted prompts have one
token length (positions line up), whose answers are single tokens or declared token sets, and -- on the model
studied -- whose fact the model knows (clean logit difference above a threshold) and whose corruption flips the
preference (corrupted logit difference below zero). A probe that fails any of these makes a recovery score of
noise. The structural part needs only the tokenizer (``--structural-only``; validity is then unknown); the
behavioural part runs the clean and corrupted prompts of every probe through the model in batched, left-padded
nnsight traces. ``--study STUDY.yaml`` checks a study's probes under that study's own rules (multi_token,
alignment, the corrupted prompt, a trace's subject, the `wrong` answer logit_diff needs, the context length) on
the model(s) it runs, so ``--write-valid`` keeps exactly the probes it can run; without a study, ``--multi-token``,
``--alignment`` and ``--trace`` stand in for those settings (``--trace``: causal-tracing probes, a subject in the
clean prompt and the answer the model's top prediction, with no corrupted prompt or wrong answer).

The logit difference of a row is mean(logits[answer set]) - mean(logits[wrong set]) at the last position, and
p(answer) the probability of the answer set: the edit kernel's reduction of the ``logit_diff`` and ``prob``
metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clap.contract import atomic_write_text
from clap.errors import ClapError
from clap.outputs import prepare_output_file
from clap.yamlio import SourceError, load_jsonl
from interventions.probe_suggest import file_words, mismatch_message, suggest_substitutes
from interventions.probes import (
    ProbeError,
    ProbeRules,
    _answer_ids,
    context_length,
    label_key_problems,
    read_probe_specs,
    subject_problem,
)
from interventions.spec import ProbeSetSpec, ProbeSpec, StudySpec

if TYPE_CHECKING:  # imported where a model runs or a table is built: `clap --help` stays fast
    import pandas as pd
    import torch

    from clap.models import LoadedModel
    from interventions.resolved import ResolvedStudy


@dataclass
class AnswerTokens:
    """How one answer field tokenises under the study's ``multi_token`` setting: its ids, their pieces, and
    whether a study could use it as given."""

    ids: list[int]
    pieces: list[str]
    #: ``single`` (one token), ``set`` (a declared list, or under ``multi_token: set`` a string of several: the mean
    #: over them), ``first`` (a string of several cut to its first token, ``multi_token: first``), ``multi`` (a
    #: string of several that ``multi_token: error`` refuses: no logit difference is computed)
    kind: str
    problem: str = ""


@dataclass
class ProbeCheck:
    """One probe's structural and (optionally) behavioural verdict; one CSV row."""

    id: str
    origin: str
    clean: str
    corrupted: str
    labels: dict[str, str]
    n_clean: int
    n_corrupted: int
    answer: AnswerTokens
    wrong: AnswerTokens | None
    problems: list[str] = field(default_factory=list)  #: structural problems (the tokenizer alone finds them)
    clean_logit_diff: float = math.nan
    corrupted_logit_diff: float = math.nan
    #: knows = the p(answer) check (:func:`unknown_reason`): a causal trace's probe, or a probe without a ``wrong``
    #: answer in a study that needs none (no ``logit_diff`` metric); else knows = clean logit difference > threshold
    by_probability: bool = False
    #: the corrupted prompt must turn the model away from the answer (a study that runs the probe's own corrupted
    #: prompt); under ``corrupted_prompt: clean`` there is nothing to flip
    flips_needed: bool = True
    p_answer: float = math.nan  #: p(answer set | clean prompt) (probability-checked probes)
    answer_rank: int | None = None  #: rank of the answer's best token among the model's next tokens (1 = top)
    top_token: str = ""  #: the model's top next token on the clean prompt (probability-checked probes)
    #: the same on the corrupted prompt, where a probability-checked probe must flip (the fact no longer known)
    corrupted_p_answer: float = math.nan
    corrupted_answer_rank: int | None = None
    corrupted_top_token: str = ""
    suggestions: list[str] = field(default_factory=list)  #: same-length corrupted prompts (``--suggest``)
    equal_needed: bool = True  #: ``alignment: strict``: a length mismatch is a problem
    fits: bool = True  #: its prompts fit the model's context (past it, a forward indexes out of range)

    @property
    def equal_length(self) -> bool:
        return self.n_clean == self.n_corrupted

    @property
    def structural_ok(self) -> bool:
        return not self.problems

    @property
    def measured(self) -> bool:
        """Whether the model's numbers exist for this probe (answers a study could use)."""
        return not math.isnan(self.p_answer if self.by_probability else self.clean_logit_diff)

    def verdict(self, threshold: float, min_prob: float | None) -> tuple[bool | None, bool | None, list[str]]:
        """(knows, flips, reasons): the behavioural verdict and a sentence with the numbers for each failure;
        None where the model's numbers are missing (a structural problem kept the probe from running)."""
        if not self.measured:
            return None, None, []
        if self.by_probability:
            min_prob = TRACE_MIN_PROB if min_prob is None else min_prob
            reason = unknown_reason(self.answer.pieces, self.p_answer, self.answer_rank, self.top_token, min_prob)
            reasons = [reason] if reason else []
            flips = None
            if self.flips_needed and not math.isnan(self.corrupted_p_answer):
                flips = bool(unknown_reason(self.answer.pieces, self.corrupted_p_answer, self.corrupted_answer_rank,
                                            self.corrupted_top_token, min_prob))
                if not flips:
                    reasons.append(f"does not flip: the corrupted prompt still gives p(answer) = "
                                   f"{self.corrupted_p_answer:.3g} (rank {self.corrupted_answer_rank}; known at "
                                   f"rank 1 or p >= {min_prob:g})")
            return not reason, flips, reasons
        clean, corrupted = self.clean_logit_diff, self.corrupted_logit_diff
        knows = bool(clean > threshold)
        flips = bool(clean > 0 and corrupted < 0) if self.flips_needed else None
        reasons = []
        if not knows:
            reasons.append(f"does not know: clean logit difference {clean:.3f} <= --min-logit-diff {threshold:g}"
                           + (" (the clean prompt prefers the wrong answer)" if clean <= 0 else ""))
        if flips is False:
            reasons.append(f"does not flip: corrupted logit difference {corrupted:.3f} >= 0 (the corrupted prompt "
                           f"still prefers the answer)" if corrupted >= 0 else
                           f"does not flip: clean logit difference {clean:.3f} <= 0, corrupted {corrupted:.3f}")
        return knows, flips, reasons

    def row(self, threshold: float, ran_model: bool, min_prob: float | None = None) -> dict[str, Any]:
        knows, flips, reasons = self.verdict(threshold, min_prob) if ran_model else (None, None, [])
        if not ran_model:
            valid = None  # the structural checks alone cannot say: validity needs the model
        else:
            valid = bool(self.structural_ok and knows and flips is not False)
        wrong = self.wrong or AnswerTokens([], [], "none")
        return {
            "id": self.id,
            **self.labels,
            "n_clean": self.n_clean,
            "n_corrupted": self.n_corrupted,
            "equal_length": self.equal_length,
            "answer_ids": " ".join(map(str, self.answer.ids)),
            "answer_pieces": json.dumps(self.answer.pieces),
            "answer_kind": self.answer.kind,
            "wrong_ids": " ".join(map(str, wrong.ids)),
            "wrong_pieces": json.dumps(wrong.pieces),
            "wrong_kind": wrong.kind,
            "structural_ok": self.structural_ok,
            "problems": "; ".join(self.problems + reasons),
            "clean_logit_diff": self.clean_logit_diff,
            "corrupted_logit_diff": self.corrupted_logit_diff,
            **({"p_answer": self.p_answer, "answer_rank": self.answer_rank, "top_token": self.top_token}
               if self.by_probability else {}),
            **({"corrupted_p_answer": self.corrupted_p_answer, "corrupted_answer_rank": self.corrupted_answer_rank}
               if self.by_probability and self.flips_needed else {}),
            "knows": knows,
            "flips": flips,
            "valid": valid,
            **({"suggestions": json.dumps(self.suggestions)} if self.suggestions else {}),
            "origin": self.origin,
        }


#: a trace probe's fact is known when its answer is the model's top next token or at least this likely
TRACE_MIN_PROB = 0.05


def unknown_reason(answer_pieces: Sequence[str], p_answer: float, rank: int | None, top_token: str,
                   min_prob: float) -> str:
    """Why the model does not know a traced fact ("" when it does: the answer is its top next token, or
    p(answer) >= ``min_prob``), with the numbers and a hint when a leading space is the likely cause."""
    if rank == 1 or p_answer >= min_prob:
        return ""
    return (f"does not know: p(answer {list(answer_pieces)}) = {p_answer:.3g} on the clean prompt (rank {rank}, "
            f"below {min_prob:g} and not the top token), the model's top token is {top_token!r}"
            + _space_hint(answer_pieces, top_token))


def _space_hint(answer_pieces: Sequence[str], top: str) -> str:
    """A hint when the answer and the model's top token differ only in a leading space."""
    answer = "".join(answer_pieces)
    if answer.strip() and answer.strip() == top.strip() and answer != top:
        return f" (the answer {answer!r} and the top token {top!r} differ only in a leading space: write {top!r})"
    if answer[:1] not in (" ", "") and top[:1] == " ":
        return " (mind the leading space: an answer after a space is usually written with it, ' Paris')"
    return ""


#: how a problem's remedy is named: as the stand-alone check's option, or as the study's own setting (``--study``)
HINTS = {
    "multi_token": ("use --multi-token first/set (the study's probes.multi_token)",
                    "set the study's `probes.multi_token: first` or `set`"),
    "alignment": ("or --alignment right (the study's `alignment: right`)", "or set the study's `alignment: right`"),
    "corrupted": ("only a causal trace (--trace) or a study with `corrupted_prompt: clean` runs without one",
                  "the study runs each probe's own corrupted prompt (only a trace or `corrupted_prompt: clean` runs "
                  "without one)"),
    "wrong": ("causal-tracing probes: --trace; a study can measure `logit` or `prob` instead",
              "the study's metrics include logit_diff; or measure `logit` / `prob` only"),
}


def hint(name: str, for_study: bool) -> str:
    return HINTS[name][1 if for_study else 0]


def _tokenise_answer(value: Any, tokenizer: Any, origin: str, what: str, multi_token: str = "error",
                     for_study: bool = False) -> AnswerTokens:
    """Tokenise an answer as a study with ``multi_token`` would, without stopping: refusals (several tokens, an id
    outside the vocabulary, a string that tokenises to nothing) become problems."""
    try:
        ids = _answer_ids(value, tokenizer, "set", origin, what)
    except ProbeError as exc:
        return AnswerTokens([], [], "invalid", str(exc).removeprefix(f"{origin}: "))
    pieces = [tokenizer.decode([i]) for i in ids]
    values = value if isinstance(value, list) else [value]
    several = [v for v in values if isinstance(v, str) and len(tokenizer(v, add_special_tokens=False)["input_ids"]) > 1]
    if several and multi_token == "error":
        if isinstance(value, list):
            problem = (f"{what} set member(s) {several} are several tokens each: give single tokens or "
                       f"{hint('multi_token', for_study)}")
        else:
            problem = (f"{what} {value!r} is {len(ids)} tokens {pieces}: give one token (mind the leading space) or a "
                       f"list of tokens, or {hint('multi_token', for_study)}")
        return AnswerTokens(ids, pieces, "multi", problem)
    if several and multi_token == "first":
        ids = _answer_ids(value, tokenizer, "first", origin, what)
        return AnswerTokens(ids, [tokenizer.decode([i]) for i in ids], "first" if len(ids) == 1 else "set")
    if isinstance(value, list) or len(ids) > 1:
        return AnswerTokens(ids, pieces, "set" if len(ids) > 1 else "single")
    return AnswerTokens(ids, pieces, "single")


def structural_checks(specs: Sequence[tuple[str, ProbeSpec]], tokenizer: Any, rules: ProbeRules | None = None,
                      suggest: bool = False, config: Any = None, for_study: bool = False) -> list[ProbeCheck]:
    """Token lengths, answer tokenisation, duplicate ids and duplicate clean prompts, per probe, under a study's
    :class:`~interventions.probes.ProbeRules` (``multi_token``, ``alignment``, the corrupted prompt, a trace's
    subject, the ``wrong`` answer ``logit_diff`` needs); prompts longer than the model's context when its ``config``
    is given; with ``suggest``, same-length substitutes for the corrupted words of each length mismatch.
    ``for_study``: the rules are a study's own (``--study``): remedies name its settings, and a clean prompt shared
    by several probes (which a study runs) is no problem."""
    rules = rules or ProbeRules()
    checks: list[ProbeCheck] = []
    words = file_words([t for _, spec in specs for t in (spec.clean, spec.corrupted or "", *spec.labels.values())]) \
        if suggest else []
    own_corrupted = rules.corrupted_prompt == "probe"
    limit = context_length(config) if config is not None else None
    for index, (origin, spec) in enumerate(specs):
        probe_id = spec.id or f"p{index:04d}"
        corrupted = spec.corrupted if spec.corrupted is not None and own_corrupted else spec.clean
        answer = _tokenise_answer(spec.answer, tokenizer, origin, "answer", rules.multi_token, for_study)
        wrong = (_tokenise_answer(spec.wrong, tokenizer, origin, "wrong", rules.multi_token, for_study)
                 if spec.wrong is not None else None)
        check = ProbeCheck(
            id=probe_id,
            origin=origin,
            clean=spec.clean,
            corrupted=corrupted,
            labels=dict(spec.labels),
            n_clean=len(tokenizer(spec.clean)["input_ids"]),
            n_corrupted=len(tokenizer(corrupted)["input_ids"]),
            answer=answer,
            wrong=wrong,
            by_probability=rules.trace or (wrong is None and not rules.needs_wrong),
            flips_needed=rules.flips_needed,
            equal_needed=rules.alignment == "strict" and own_corrupted,
        )
        if spec.corrupted is None and own_corrupted:
            check.problems.append(f"no `corrupted` prompt: {hint('corrupted', for_study)}")
        elif not check.equal_length and check.equal_needed:
            check.problems.append(mismatch_message(tokenizer, spec.clean, corrupted, spec.labels.get(rules.subject
                                                                                                   or "subject"),
                                                   suggesting=suggest)
                                  + f"; {hint('alignment', for_study)}")
            if suggest:
                check.suggestions = suggest_substitutes(tokenizer, spec.clean, corrupted, words)
                check.problems.append("same-length substitutes: " + (", ".join(map(repr, check.suggestions))
                                                                     or "none found"))
        check.problems += [a.problem for a in (answer, wrong) if a is not None and a.problem]
        if rules.subject is not None:
            problem = subject_problem(spec, rules.subject)
            if problem:
                check.problems.append(problem)
        if wrong is None and rules.needs_wrong:
            check.problems.append(f"no `wrong` answer: the logit difference (metric logit_diff) is undefined "
                                  f"({hint('wrong', for_study)})")
        elif wrong is not None and set(answer.ids) & set(wrong.ids):
            check.problems.append(f"answer and wrong share token(s) {sorted(set(answer.ids) & set(wrong.ids))}")
        if limit is not None:
            too_long = [f"its {which} prompt is {n} tokens, longer than the model's context of {limit[0]} tokens "
                        f"({limit[1]}); shorten it" for which, n in (("clean", check.n_clean),
                                                                      ("corrupted", check.n_corrupted))
                        if n > limit[0] and (which == "clean" or own_corrupted)]
            check.problems += too_long
            check.fits = not too_long
        checks.append(check)
    for check, duplicates, label in zip(checks, duplicate_problems(checks, clean_prompts=not for_study),
                                        label_problems(checks, rules.subject), strict=True):
        check.problems += duplicates + ([label] if label else [])
    return checks


def duplicate_problems(checks: Sequence[ProbeCheck], clean_prompts: bool = True) -> list[list[str]]:
    """Per probe, the earlier probes it repeats: its id, and (``clean_prompts``) its clean prompt, a likely copy in
    a probe file (a study runs probes that share a clean prompt, e.g. two subjects traced in one sentence)."""
    first_id: dict[str, str] = {}
    first_clean: dict[str, str] = {}
    out = []
    for check in checks:
        found = []
        if check.id in first_id:
            found.append(f"duplicate id (first at {first_id[check.id]})")
        if clean_prompts and check.clean in first_clean:
            found.append(f"duplicate clean prompt (first at {first_clean[check.clean]})")
        first_id.setdefault(check.id, check.origin)
        first_clean.setdefault(check.clean, check.origin)
        out.append(found)
    return out


def label_problems(checks: Sequence[ProbeCheck], subject: str | None) -> list[str]:
    """Per probe, "" or why its label fields differ from the other probes' (a study needs the same fields on every
    probe: they become result columns; :func:`interventions.probes.label_key_problems`)."""
    found = {}
    for problem in label_key_problems([(c.origin, c.id, c.labels) for c in checks], skip=subject):
        origin, _, text = problem.partition(": probe ")
        found[origin] = "probe " + text
    return [found.get(c.origin, "") for c in checks]


def last_token_logits(model: LoadedModel, prompts: Sequence[Sequence[int]], batch_size: int = 64,
                      remote: bool | str = False) -> torch.Tensor:
    """Last-position logits ``[n_prompts, vocab]`` (in the model's dtype) from batched nnsight traces of left-padded
    prompts: the inputs a study's own runs give the model (ids and attention mask), so the check measures what the
    study would. ``remote``: NDIF (``True``) or nnsight's local simulation of it (``"local"``); only the last
    position's logits come back. The unembedding runs on the last position alone where the model allows it."""
    import inspect

    import torch

    from interventions.alignment import left_pad
    from interventions.full_traces import device_of, trace_kwargs

    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    device = device_of(model.nn, remote)
    keep = "logits_to_keep" in inspect.signature(model.nn._module.forward).parameters
    out = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = left_pad(prompts[start : start + batch_size], pad_id)
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                  **({"logits_to_keep": 1} if keep else {})}
        with torch.no_grad(), model.nn.trace(**inputs, **trace_kwargs(remote)):
            logits = model.nn.output.logits[:, -1, :].save()
        out.append(logits.detach().cpu())
    return torch.cat(out)


def logit_diffs(logits: torch.Tensor, answer_ids: Sequence[int], wrong_ids: Sequence[int]) -> torch.Tensor:
    """Mean over the answer set minus mean over the wrong set, per row, reduced in float64 by the edit kernel (the
    same reduction as patching's ``logit_diff``)."""
    import torch

    from interventions import kernel

    answer_index, answer_mask = kernel.token_sets([answer_ids] * len(logits))
    wrong_index, wrong_mask = kernel.token_sets([wrong_ids] * len(logits))
    return kernel.logit_difference(logits.to(torch.float64), answer_index, answer_mask, wrong_index, wrong_mask)


def behavioural_checks(checks: Sequence[ProbeCheck], model: LoadedModel, batch_size: int = 64,
                       corrupted_model: LoadedModel | None = None, remote: bool | str = False) -> None:
    """Fill in the model's numbers of every probe whose answers a study could use: clean and corrupted logit
    differences; p(answer), its rank and the top token on the clean prompt of probability-checked probes. A probe
    whose answer a study would refuse (a multi-token string under ``multi_token: error``) keeps NaN: an average over
    its tokens is not what the study would measure. ``corrupted_model`` runs the corrupted prompts when another
    model does (cross-model patching: the source model's run is the clean one when denoising); each distinct
    prompt runs once per model."""
    import torch

    usable = [c for c in checks if c.answer.ids and c.answer.kind != "multi" and c.fits]
    pairs = [c for c in usable if not c.by_probability and c.wrong is not None and c.wrong.ids
             and c.wrong.kind != "multi"]
    by_probability = [c for c in usable if c.by_probability]
    corrupted_model = corrupted_model or model
    runs: dict[int, tuple[LoadedModel, dict[str, int]]] = {}

    def row(which: LoadedModel, prompt: str) -> tuple[int, int]:
        _, rows = runs.setdefault(id(which), (which, {}))
        return id(which), rows.setdefault(prompt, len(rows))

    wanted = [(c, row(model, c.clean), row(corrupted_model, c.corrupted)) for c in pairs]
    known = [(c, row(model, c.clean), row(corrupted_model, c.corrupted) if c.flips_needed else None)
             for c in by_probability]
    logits = {key: last_token_logits(which, [which.tokenizer(p)["input_ids"] for p in rows], batch_size, remote)
              for key, (which, rows) in runs.items() if rows}
    for check, (clean_key, clean_row), (corrupted_key, corrupted_row) in wanted:
        both = torch.stack([logits[clean_key][clean_row], logits[corrupted_key][corrupted_row]])
        values = logit_diffs(both, check.answer.ids, check.wrong.ids)
        check.clean_logit_diff, check.corrupted_logit_diff = float(values[0]), float(values[1])
    for check, (key, index), corrupted in known:
        check.p_answer, check.answer_rank, top = answer_probability(logits[key][index], check.answer.ids)
        check.top_token = model.tokenizer.decode([top])
        if corrupted is not None:
            check.corrupted_p_answer, check.corrupted_answer_rank, top = answer_probability(
                logits[corrupted[0]][corrupted[1]], check.answer.ids)
            check.corrupted_top_token = corrupted_model.tokenizer.decode([top])


def answer_probability(logits: torch.Tensor, answer_ids: Sequence[int]) -> tuple[float, int, int]:
    """(p(answer set), rank of its best token among all next tokens (1 = the model's top prediction), the top
    token's id) from one row of last-position logits; the probability of a set is the sum over its tokens, as the
    ``prob`` metric."""
    from interventions import kernel

    ids = list(answer_ids)
    index, mask = kernel.token_sets([ids])
    metrics, _ = kernel.reduce_metrics(logits[None], index, mask, index, mask)  # patching's own reduction
    best = logits[ids].max()
    return float(metrics[0, 2]), int((logits > best).sum()) + 1, int(logits.argmax())


def trace_knowledge(probes: Sequence[Any], model: LoadedModel, min_prob: float, batch_size: int = 64,
                    remote: bool | str = False) -> list[str]:
    """``probe (origin): reason`` for every tokenised probe (``interventions.probes.Probe``) whose fact the model
    does not know on its clean prompt (:func:`unknown_reason`): what ``clap trace`` checks before tracing, since a
    trace of a fact the model does not know restores nothing worth measuring."""
    logits = last_token_logits(model, [p.clean_ids for p in probes], batch_size, remote)
    decode = model.tokenizer.decode
    out = []
    for probe, row in zip(probes, logits, strict=True):
        p_answer, rank, top = answer_probability(row, probe.answer_ids)
        reason = unknown_reason([decode([i]) for i in probe.answer_ids], p_answer, rank, decode([top]), min_prob)
        if reason:
            out.append(f"probe {probe.id} ({probe.origin}): {reason}")
    return out


def load_tokenizer(source: str) -> Any:
    """The model's tokenizer alone: no weights are read or converted.

    A built-in model or a ``.gguf`` file gives its tokenizer from the GGUF's metadata (transformers reads the
    vocabulary and merges without dequantising a tensor), so ``--structural-only`` never waits for the one-off
    conversion that patching needs. A folder holding only ``vocab.json`` + ``merges.txt`` (GPT-2 BPE files) is read
    with ``GPT2Tokenizer``, because the fast class silently builds an empty tokenizer from those two files.
    """
    from transformers import AutoTokenizer, GPT2Tokenizer

    from clap.models import prepare_tokenizer, resolve_source

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vocab.json").is_file():
        if not (path / "merges.txt").is_file():
            raise ClapError(f"{path}: vocab.json without merges.txt; a GPT-2 tokenizer needs both")
        return prepare_tokenizer(GPT2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt")))
    gguf = gguf_file_of(source)
    if gguf is not None:
        try:
            return prepare_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        except (OSError, ValueError) as exc:
            raise ClapError(f"could not read a tokenizer from the GGUF file {gguf}: {exc}") from exc
    location, _ = resolve_source(source)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(location))
    except OSError as exc:
        raise ClapError(f"could not load a tokenizer from {location!r}: {exc}") from exc


def gguf_file_of(source: str) -> Path | None:
    """The GGUF file whose metadata holds ``source``'s tokenizer: a built-in model's packaged file (a built-in
    fine-tuned model shares its base model's tokenizer), a ``.gguf`` path; None for other sources."""
    from clap.builtin_adapters import BUILTIN_ADAPTERS
    from clap.models import BUILTIN_GGUF, ModelLoadError, builtin_gguf_path

    base = BUILTIN_ADAPTERS[source][0] if source in BUILTIN_ADAPTERS else source
    if base in BUILTIN_GGUF:
        return builtin_gguf_path(base)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path
    return None


def read_specs(path: Path) -> list[tuple[str, ProbeSpec]]:
    try:
        return read_probe_specs(ProbeSetSpec(file=str(path)), Path.cwd())
    except SourceError as exc:
        raise ProbeError(str(exc)) from None


def check_probes(path: Path, tokenizer: Any, model: LoadedModel | None = None,
                 min_logit_diff: float = 0.0, batch_size: int = 64, *, multi_token: str = "error",
                 alignment: str = "strict", trace: bool = False, subject: str = "subject",
                 min_prob: float | None = None, suggest: bool = False) -> pd.DataFrame:
    """The stand-alone check of a probe file as a frame, one row per probe (the CLI prints and writes this).
    ``multi_token`` and ``alignment`` stand in for a study's settings; ``trace`` checks causal-tracing probes
    (knows: the answer is the model's top next token, or p(answer) >= ``min_prob``, by default
    :data:`TRACE_MIN_PROB`). :func:`check_study` takes all of them from a study instead."""
    import pandas as pd

    rules = (ProbeRules(multi_token=multi_token, alignment=alignment, corrupted_prompt="clean", subject=subject,
                        needs_wrong=False) if trace else ProbeRules(multi_token=multi_token, alignment=alignment))
    checks = structural_checks(read_specs(path), tokenizer, rules, suggest,
                               config=model.hf.config if model is not None else None)
    if model is not None:
        behavioural_checks(checks, model, batch_size)
    return pd.DataFrame([c.row(min_logit_diff, model is not None, min_prob) for c in checks])


def check_study(study: ResolvedStudy, min_logit_diff: float = 0.0, *, min_prob: float | None = None,
                batch_size: int = 64, suggest: bool = False,
                records: Sequence[tuple[str, ProbeSpec]] | None = None) -> pd.DataFrame:
    """``clap probes check --study``: the study's probes checked under its own rules (:class:`ProbeRules`) on the
    models it runs, as one frame. Cross-model patching measures the clean prompt on the model that runs it (the
    source model when denoising) and the corrupted prompt on the other; a remote study's forwards run on NDIF.

    Every problem the study's own resolution found (:meth:`ResolvedStudy.for_probe_check`) is attached to its probe
    where the checks above did not already find one, so a probe called valid here is one the study runs; problems
    of the whole set are in ``frame.attrs["study_problems"]``. Baseline interventions (a trace's noise) are not
    applied: the corrupted run here is the corrupted prompt itself. ``records``: the probe records with their own
    origins when the spec holds them inline (:class:`StudyRun`)."""
    import pandas as pd

    from interventions.resolved import check_group_probes

    spec = study.spec
    if study.source_model is not None:
        check_models_match(study)
    records = list(records) if records is not None else study_specs(spec)
    checks = structural_checks(records, study.model.tokenizer, study.rules, suggest, config=study.model.hf.config,
                               for_study=True)
    check_group_probes(spec, checks)
    problems = study.probe_problems
    if spec.probes.inline is not None:  # name the record behind each inline probe
        problems = [inline_origins(problem, records) for problem in problems]
    left = attach_problems(checks, problems)
    clean, corrupted = study.model, study.source_model
    if corrupted is not None and spec.direction == "denoising":
        clean, corrupted = corrupted, clean
    behavioural_checks(checks, clean, batch_size, corrupted_model=corrupted, remote=spec.execution.remote)
    frame = pd.DataFrame([c.row(min_logit_diff, True, min_prob) for c in checks])
    frame.attrs["study_problems"] = left
    return frame


def check_models_match(study: ResolvedStudy) -> None:
    """Cross-model patching refuses a source model of another shape or tokenizer (a study-level error, raised as the
    run raises it): the checks ``Study.plan`` makes before the first batch."""
    from interventions.probes import load_probes
    from interventions.study import check_compatible, check_same_tokens

    spec, source = study.spec, study.source_model
    where = spec.where(("source_model",))
    check_compatible(study.model.hf.config, source.hf.config, where)
    theirs = load_probes(spec.probes, source.tokenizer, spec.base_dir, corrupted_prompt=spec.corrupted_prompt,
                         problems=[], warn=False)
    if [p.id for p in theirs] == [p.id for p in study.probes]:  # else the probe problems say why
        check_same_tokens(study.probes, theirs, where)


def study_specs(spec: StudySpec) -> list[tuple[str, ProbeSpec]]:
    """The study's probe records (its file, or its inline list), unvalidated against any model."""
    try:
        return read_probe_specs(spec.probes, spec.base_dir)
    except SourceError as exc:
        raise ProbeError(str(exc)) from None


def inline_origins(problem: str, records: Sequence[tuple[str, ProbeSpec]]) -> str:
    """``probes.inline[i]`` in a problem replaced by the origin of record ``i``."""
    import re

    return re.sub(r"probes\.inline\[(\d+)\]", lambda m: records[int(m.group(1))][0], problem)


def attach_problems(checks: Sequence[ProbeCheck], problems: Sequence[str]) -> list[str]:
    """Each of a study's probe problems added to the probe it is about, when that probe has no problem yet; returns
    the problems about no probe. A problem is about the probe it starts with: ``file:line: ...`` or ``probe ID
    (file:line): ...`` (a later origin in the text, such as a duplicate's "first at", names another probe)."""
    left = []
    for problem in problems:
        owner = next((c for c in checks if problem.startswith((f"{c.origin}: ", f"probe {c.id} ({c.origin})"))),
                     None)
        if owner is None:
            left.append(problem)
        elif not owner.problems:
            owner.problems.append(f"the study refuses it: {problem}")
    return left


def summary_line(frame: pd.DataFrame, ran_model: bool) -> str:
    structural = f"structural ok {int(frame['structural_ok'].sum())}"
    if not ran_model:
        return (f"validity unknown: structural checks only ({structural} of {len(frame)}); without "
                f"--structural-only the model says which probes it knows and flips")
    parts = [f"{int(frame['valid'].fillna(False).astype(bool).sum())} valid / {len(frame)} total", structural,
             f"knows {int(frame['knows'].fillna(False).astype(bool).sum())}"]
    if frame["flips"].notna().any():
        parts.append(f"flips {int(frame['flips'].fillna(False).astype(bool).sum())}")
    return "; ".join(parts)


def write_valid(records: Sequence[tuple[str, ProbeSpec]], frame: pd.DataFrame, target: Path,
                column: str = "valid") -> int:
    """The probes whose ``column`` is True in every row of theirs (the valid ones, on every model checked;
    ``structural_ok`` under ``--structural-only``), as JSONL in file order, atomically: a JSONL probe as its source
    record (all fields, PMIDs included), a YAML or inline probe as the validated probe with its labels as top-level
    keys. ``frame``'s index is the record's position in ``records`` (each model's frame repeats it)."""
    verdicts = frame[column].astype("boolean").fillna(False).groupby(level=0).all()
    files: dict[str, dict[int, Any]] = {}
    lines = []
    for index, (origin, spec) in enumerate(records):
        if not verdicts.get(index, False):
            continue
        path, _, number = origin.rpartition(":")
        if Path(path).suffix in (".jsonl", ".json") and number.isdigit():  # origins are "<path>:<line>"
            if path not in files:
                files[path] = dict(load_jsonl(Path(path)))
            lines.append(json.dumps(files[path][int(number)]))
        else:
            record = spec.model_dump(exclude_none=True, exclude={"labels"})
            lines.append(json.dumps({**record, **spec.labels}))
    atomic_write_text(target, "".join(line + "\n" for line in lines))
    return len(lines)


SHOWN = ["id", "n_clean", "n_corrupted", "answer_pieces", "wrong_pieces", "clean_logit_diff", "corrupted_logit_diff",
         "p_answer", "answer_rank", "top_token", "knows", "flips", "valid", "problems"]
#: the model's columns (left out under --structural-only)
MODEL_COLUMNS = ("clean_logit_diff", "corrupted_logit_diff", "p_answer", "answer_rank", "top_token", "knows", "flips",
                 "valid")
#: columns dropped, in this order, when the table is still too wide for the terminal with the problems cut short
DROPPABLE = ("top_token", "wrong_pieces", "answer_pieces", "n_corrupted", "corrupted_logit_diff", "flips",
             "answer_rank", "n_clean", "knows", "clean_logit_diff", "p_answer")
#: the narrowest the problems column is cut to before a column is dropped; the longest an id is shown
MIN_PROBLEMS, MAX_ID = 20, 24


def fit_table(frame: pd.DataFrame, columns: Sequence[str], width: int) -> str:
    """The table at most ``width`` characters wide: ids and the ``problems`` text cut short (with an ellipsis),
    then the least needed columns dropped (:data:`DROPPABLE`). The full text is printed below it and in the CSV."""
    import pandas as pd

    columns = list(columns)
    shown = frame[columns].copy()
    shown["id"] = shown["id"].map(lambda t: _cut(str(t), MAX_ID))
    for name in ("answer_pieces", "wrong_pieces", "top_token"):
        if name in shown:
            shown[name] = shown[name].map(lambda t: _cut(str(t), 18))
    formats = {"p_answer": "{:.3g}", "answer_rank": "{:.0f}"}  # probabilities span decades; ranks are counts
    for name, form in formats.items():
        if name in shown:
            shown[name] = shown[name].map(lambda x, form=form: "-" if pd.isna(x) else form.format(x))

    def render(table: pd.DataFrame) -> str:
        return table.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-")

    droppable = [c for c in DROPPABLE if c in columns]
    while True:
        others = render(shown.drop(columns=["problems"])) if "problems" in shown else render(shown)
        room = width - len(others.splitlines()[0]) - 2
        if room >= MIN_PROBLEMS or not droppable:
            break
        shown = shown.drop(columns=[droppable.pop(0)])
    if "problems" in shown:
        longest = int(shown["problems"].map(len).max() or 0)
        shown["problems"] = shown["problems"].map(lambda t: _cut(t, max(room, MIN_PROBLEMS, len("problems"))))
        if longest <= room:
            shown["problems"] = frame["problems"]
    return render(shown)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "\u2026"


def print_report(frame: pd.DataFrame, ran_model: bool, width: int | None = None) -> None:
    """The per-probe table fitted to the terminal, then every probe's problems in full, wrapped to it."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    unused = {c for c in MODEL_COLUMNS if c in frame and frame[c].isna().all()}  # e.g. logit differences of traces
    if "p_answer" in frame:  # trace probes: the corrupted prompt is the clean one
        unused |= {"n_corrupted", "wrong_pieces"}
    columns = [c for c in SHOWN if c in frame.columns and (ran_model or c not in MODEL_COLUMNS) and c not in unused]
    print(fit_table(frame, columns, width))
    flawed = frame[frame["problems"].astype(str) != ""]
    if len(flawed):  # one problem a line, unwrapped: a wrap inside a token would hide its leading space
        print(f"\nproblems ({len(flawed)} probes):")
        for row in flawed.itertuples(index=False):
            print(f"  {row.id} ({row.origin}):")
            for problem in str(row.problems).split("; "):
                print(f"      {problem}")


#: what ``--study`` takes from the study instead: the option, its default, and the spec's field
STUDY_SETS = (("file", None, "probes"), ("model", None, "model / models"),
              ("multi_token", None, "probes.multi_token"), ("alignment", None, "alignment"),
              ("trace", False, "trace"), ("subject", None, "trace.subject"), ("dtype", None, "execution.dtype"))


@dataclass
class StudyRun:
    """One model's run of a study as the probe check sees it: the ``clap patch`` spec that model runs, and the
    probe records with the origins a user can open (a study file's ``probes.files`` are read file by file; its spec
    then holds them inline, ``probes.inline[i]`` being ``records[i]``)."""

    label: str  #: the model's name in a study with several; "" for one
    spec: StudySpec
    records: list[tuple[str, ProbeSpec]]


#: reads ``--study FILE`` into the runs to check and notes on what is left out (e.g. a model the run trains)
StudyLoader = Callable[[Path], tuple[list[StudyRun], list[str]]]


def patch_spec_runs(path: Path) -> tuple[list[StudyRun], list[str]]:
    """A ``clap patch`` spec: one run (``clap run`` study files are read by the command line's own loader)."""
    spec = StudySpec.from_yaml(path)
    return [StudyRun("", spec, study_specs(spec))], []


def run_check(args: argparse.Namespace, load_study: StudyLoader = patch_spec_runs) -> int:
    if args.min_logit_diff < 0 or not math.isfinite(args.min_logit_diff):
        raise ProbeError(f"--min-logit-diff must be a finite number >= 0, got {args.min_logit_diff}")
    if args.min_prob is not None and not 0 <= args.min_prob <= 1:
        raise ProbeError(f"--min-prob must be a probability in [0, 1], got {args.min_prob}")
    if args.study:
        return run_study_check(args, load_study)
    if not args.file or not args.model:
        raise ProbeError("give a probe file and --model (`clap probes check PROBES.jsonl --model MODEL`), or a study "
                         "whose probes, settings and model are checked (`clap probes check --study STUDY.yaml`)")
    path = Path(args.file)
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found")
    specs = read_specs(path)  # bad probe files fail here, before any model is loaded
    prepare_outputs(args)
    model = None
    if args.structural_only:
        tokenizer = load_tokenizer(args.model)
    else:
        from clap.models import load_model

        model = load_model(args.model, dtype=args.dtype or "float32", device=args.device or "cpu")
        tokenizer = model.tokenizer
    frame = check_probes(path, tokenizer, model, args.min_logit_diff, args.batch_size,
                         multi_token=args.multi_token or "error", alignment=args.alignment or "strict",
                         trace=args.trace, subject=args.subject or "subject", min_prob=args.min_prob,
                         suggest=args.suggest)
    show(frame, model is not None)
    write_outputs(args, frame, specs, model is not None)
    return 0


def run_study_check(args: argparse.Namespace, load_study: StudyLoader) -> int:
    """``--study``: the study's probes under its own settings, on each model it runs (``--device`` overrides
    ``execution.device`` as in ``clap patch``). With several models, the CSV carries a ``model`` column and a probe
    is valid when it is valid on every model checked."""
    import pandas as pd

    from clap.devices import resolve_device

    given = [(f"--{name.replace('_', '-')}" if name != "file" else "a probe file", field)
             for name, default, field in STUDY_SETS if getattr(args, name) != default]
    if given:
        raise ProbeError(f"--study takes {', '.join(g for g, _ in given)} from the study "
                         f"({', '.join(f for _, f in given)}); drop {'it' if len(given) == 1 else 'them'} or check a "
                         f"probe file without --study")
    runs, notes = load_study(Path(args.study))  # bad specs and probe files fail here, before any model is loaded
    if args.device:
        resolve_device(args.device, where="--device")
        for run in runs:
            run.spec.execution.device = args.device
    prepare_outputs(args)
    frames = []
    for run in runs:
        if len(runs) > 1:
            print(f"\n== model {run.label} ({run.spec.model.source}) ==")
        frame = check_study_run(run, args)
        show(frame, not args.structural_only)
        frames.append(frame.assign(model=run.label) if len(runs) > 1 else frame)
    for note in notes:
        print(f"note: {note}")
    if not frames:
        raise ProbeError(f"{args.study}: no model of the study can be checked here ({'; '.join(notes)})")
    combined = pd.concat(frames) if len(frames) > 1 else frames[0]  # the index stays each probe's position
    written = write_outputs(args, combined, runs[0].records, not args.structural_only)
    if written:
        print(f"point the study's `probes: {{file: ...}}` at {args.write_valid} to run them")
    return 0


def check_study_run(run: StudyRun, args: argparse.Namespace) -> pd.DataFrame:
    """One model's check: structural with the tokenizer alone (``--structural-only``), else on the loaded model(s)
    through the study's resolution."""
    from clap.devices import torch_threads
    from interventions.full_traces import check_remote
    from interventions.resolved import ResolvedStudy, located
    from interventions.study import Study

    spec = run.spec
    if not run.records:
        raise ProbeError(f"{spec.where(('probes',))}: the probe set is empty")
    if args.structural_only:
        tokenizer = load_tokenizer(located(spec, spec.model.tokenizer or spec.model.source) or spec.model.source)
        return check_study_structure(spec, tokenizer, args.suggest, records=run.records)
    study = Study(spec)
    for model in (spec.model, spec.source_model):  # NDIF: the key and the hosted model, before anything loads
        if model is not None:
            check_remote(spec.execution.remote, model.source)
    with torch_threads(spec.execution.threads):
        resolved = ResolvedStudy.for_probe_check(spec, study.model, study.source_model)
        return check_study(resolved, args.min_logit_diff, min_prob=args.min_prob, batch_size=args.batch_size,
                           suggest=args.suggest, records=run.records)


def check_study_structure(spec: StudySpec, tokenizer: Any, suggest: bool = False,
                          records: Sequence[tuple[str, ProbeSpec]] | None = None) -> pd.DataFrame:
    """``--study --structural-only``: the study's probes under its rules with its tokenizer alone."""
    import pandas as pd

    from interventions.resolved import check_group_probes

    checks = structural_checks(records if records is not None else study_specs(spec), tokenizer,
                               ProbeRules.of(spec), suggest, for_study=True)
    check_group_probes(spec, checks)
    return pd.DataFrame([c.row(0.0, False) for c in checks])


def prepare_outputs(args: argparse.Namespace) -> None:
    """The CSV and valid-probe targets checked before a model loads, not after the check has run."""
    for option, target in (("-o", args.output), ("--write-valid", args.write_valid)):
        if target:
            prepare_output_file(target, what=option)


def show(frame: pd.DataFrame, ran_model: bool) -> None:
    """The table, the summary line and the problems of the whole probe set."""
    print_report(frame, ran_model)
    print(summary_line(frame, ran_model))
    for problem in frame.attrs.get("study_problems", []):
        print(f"study problem: {problem}")


def write_outputs(args: argparse.Namespace, frame: pd.DataFrame, records: Sequence[tuple[str, ProbeSpec]],
                  ran_model: bool) -> int:
    """The CSV (``-o``) and the valid probes (``--write-valid``; the structurally sound ones without a model);
    returns how many valid probes were written (0 under ``--structural-only``, whose probes are not known valid)."""
    if args.output:
        atomic_write_text(Path(args.output), frame.to_csv(index=False))
        print(f"wrote {args.output} (every column, problems in full)")
    if not args.write_valid:
        return 0
    if not ran_model:
        n = write_valid(records, frame, Path(args.write_valid), column="structural_ok")
        print(f"wrote {n} probes that pass the structural checks to {args.write_valid} (not checked on the model: "
              f"whether it knows and flips them is unknown)")
        return 0
    n = write_valid(records, frame, Path(args.write_valid))
    print(f"wrote {n} valid probes to {args.write_valid}" + ("" if n else " (none: a study needs at least one)"))
    return n


def register_probes(subparsers: Any, load_study: StudyLoader = patch_spec_runs) -> None:
    """``clap probes check``; registered on its own so it grows without editing interventions/cli.py.
    ``load_study`` reads ``--study FILE``: the command line passes one that reads ``clap run`` study files too."""
    probes = subparsers.add_parser("probes", help="check probe files against a model's tokenizer and knowledge")
    actions = probes.add_subparsers(dest="probes_action", metavar="ACTION")
    probes.set_defaults(func=lambda args: probes.print_help() or 2)
    check = actions.add_parser(
        "check",
        help="token lengths, answer tokens, clean/corrupted logit differences and validity per probe",
        description=__doc__.split("\n\n")[1],
    )
    check.add_argument("file", nargs="?", help="probe file (.jsonl or .yaml); or --study")
    check.add_argument("--study", metavar="STUDY.yaml",
                       help="check a study's probes under its own settings (multi_token, alignment, corrupted "
                            "prompt, trace subject, metrics, context length) on the model(s) it runs; a probe "
                            "called valid is one the study runs")
    check.add_argument("--model", help="hub id, model folder, .gguf file, built-in name, or (with "
                       "--structural-only) a folder of GPT-2 vocab.json + merges.txt")
    check.add_argument("-o", "--output", help="write the per-probe table as CSV")
    check.add_argument("--write-valid", metavar="VALID.jsonl", help="write the valid probes (source records) here")
    check.add_argument("--min-logit-diff", type=float, default=0.0,
                       help="the model knows a fact when its clean logit difference exceeds this (default 0)")
    check.add_argument("--multi-token", choices=["error", "first", "set"],
                       help="an answer string of several tokens, as the study's probes.multi_token: a problem "
                            "(error, default), its first token (first), or the mean over its tokens (set)")
    check.add_argument("--alignment", choices=["strict", "right"],
                       help="as the study's alignment: strict (default) needs clean and corrupted prompts of one "
                            "token length; right aligns them at the end")
    check.add_argument("--trace", action="store_true",
                       help="causal-tracing probes: a subject in the clean prompt, no corrupted prompt or wrong "
                            "answer needed; the model knows the fact when the answer is its top next token or "
                            "likely enough (--min-prob)")
    check.add_argument("--subject", metavar="FIELD",
                       help="the probe field naming the subject (the study's trace.subject; default subject)")
    check.add_argument("--min-prob", type=float, default=None,
                       help=f"with --trace: the model knows the fact when the answer is its top next token or "
                            f"p(answer) is at least this (default {TRACE_MIN_PROB})")
    check.add_argument("--suggest", action="store_true",
                       help="for each length mismatch, list corrupted prompts with the differing words replaced "
                            "so the token counts match (from the file's words and the vocabulary)")
    check.add_argument("--structural-only", action="store_true",
                       help="tokenizer checks only; no weights are loaded or converted (validity is then unknown)")
    check.add_argument("--device", help="cpu (default), cuda, ...; with --study, overrides execution.device")
    check.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default float32")
    check.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass (default 64)")
    check.set_defaults(func=lambda args: run_check(args, load_study))


register = register_probes
