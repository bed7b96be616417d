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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interventions.probe_suggest import file_words, mismatch_message, suggest_substitutes
from interventions.probes import (
    ProbeError,
    ProbeRules,
    _answer_ids,
    context_length,
    label_field_differences,
    read_probe_specs,
    subject_problem,
    too_long_problem,
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
            too_long = [too_long_problem(which, n, limit)
                        for which, n in (("clean", check.n_clean), ("corrupted", check.n_corrupted))
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
    probe: they become result columns; :func:`interventions.probes.label_field_differences`)."""
    differences = label_field_differences([c.labels for c in checks], skip=subject)
    return [f"probe {c.id} {difference}" if difference else "" for c, difference in zip(checks, differences,
                                                                                         strict=True)]


def last_token_logits(model: LoadedModel, prompts: Sequence[Sequence[int]], batch_size: int = 64,
                      remote: bool | str = False) -> torch.Tensor:
    """Last-position logits ``[n_prompts, vocab]`` (in the model's dtype) from batched nnsight traces of left-padded
    prompts: the inputs a study's own runs give the model (ids and attention mask), so the check measures what the
    study would. ``remote``: NDIF (``True``) or nnsight's local simulation of it (``"local"``); only the last
    position's logits come back. The unembedding runs on the last position alone where the model allows it."""
    import torch

    from interventions.alignment import left_pad
    from interventions.full_traces import device_of, keeps_last_logits, trace_kwargs

    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    device = device_of(model.nn, remote)
    keep = keeps_last_logits(model.hf)
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


def read_specs(path: Path) -> list[tuple[str, ProbeSpec]]:
    """A stand-alone probe file's records (a relative path is the working directory's)."""
    return read_probe_specs(ProbeSetSpec(file=str(path)), Path.cwd())


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
    records = list(records) if records is not None else read_probe_specs(spec.probes, spec.base_dir)
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


def check_study_structure(spec: StudySpec, tokenizer: Any, records: Sequence[tuple[str, ProbeSpec]],
                          suggest: bool = False) -> pd.DataFrame:
    """``--study --structural-only``: the study's probe ``records`` under its rules with its tokenizer alone."""
    import pandas as pd

    from interventions.resolved import check_group_probes

    checks = structural_checks(records, tokenizer, ProbeRules.of(spec), suggest, for_study=True)
    check_group_probes(spec, checks)
    return pd.DataFrame([c.row(0.0, False) for c in checks])
